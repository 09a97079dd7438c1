"""Compile every kernel specialization the optimizers launch for a GPU target, without a GPU,
and report the widest global access, registers and spills read off the PTX and cubin.

    python -m fusedopt.kernels.codegen --arch sm_90 [--ptx-dir DIR]
"""
import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .. import formats
from .grad_norm import INF_NORM, P_NORM, TWO_NORM, grad_norm_kernel
from .multi_tensor import (
    NUM_WARPS,
    PARAM_ROUNDINGS,
    block_size,
    kernel_dtype,
    rule_functions,
    state_formats,
    update_kernel,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
TABLE_ARGS = ("tensor_table", "block_table")
COUNT_ARGS = ("num_tensors", "num_blocks")


def rule_specs():
    """The spec of every rule in fusedopt's registry (rules that share one, such as Adam and AdamW,
    once), by name."""
    from ..registry import RULES

    return {info.optimizer.spec.name: info.optimizer.spec for info in RULES.values()}


def code_variants(spec):
    """Each variant of a rule's code, named by its flags: every value of its options, and with the
    per-tensor integer read (spec.extra) on its richest one."""
    variants = [({name.upper(): value for name, value in zip(options._fields, options)}, options, False)
                for options in spec.option_variants()]
    if spec.extra:
        flags, options, _ = variants[-1]
        variants.append(({**flags, "EXTRA": True}, options, True))
    return variants


# The epilogue's flags: grads scaled (AMP, clipping), the lr read from memory (a tensor lr, a
# schedule's factor, both), on each rule's richest variant; then the storage variants on it: the
# bf16 param's rounding (stochastic, an fp32 master copy, a 16-bit remainder) for bf16 only, the
# states in bf16 and in 8 bits (nearest, stochastic) for fp32 params, and bf16 params with 8-bit
# states and remainders (2 + 2 + 2 bytes per param of Adam).
PLAIN = dict(SCALED_GRADS=False, LR_TENSOR=False, SCHEDULED=False, ROUNDING=False, STATES=False,
             STOCHASTIC_STATES=False)
STORAGE_VARIANTS = [(("bf16",), dict(ROUNDING=rounding)) for rounding in ("stochastic", "master", "remainder")]
STORAGE_VARIANTS += [(("fp32",), dict(STATES=precision)) for precision in ("bf16", "8bit")]
STORAGE_VARIANTS += [(("fp32",), dict(STATES="8bit", STOCHASTIC_STATES=True)),
                     (("bf16",), dict(STATES="8bit", ROUNDING="remainder"))]
KERNEL_OPTIONS = {}
for _name, _spec in rule_specs().items():
    _sets = [({**flags, **PLAIN, "SCALED_GRADS": scaled}, (_spec, options, extra), None)
             for flags, options, extra in code_variants(_spec) for scaled in (False, True)]
    _richest_flags, _richest, _ = _sets[-1]
    _sets += [({**_richest_flags, "LR_TENSOR": t, "SCHEDULED": s}, _richest, None)
              for t, s in ((True, False), (False, True), (True, True))]
    _sets += [({**_richest_flags, "SCHEDULED": True, **storage}, _richest, dtypes)
              for dtypes, storage in STORAGE_VARIANTS]
    KERNEL_OPTIONS[_name] = (update_kernel, _sets)
KERNEL_OPTIONS["grad_norm"] = (grad_norm_kernel, [(dict(NORM=kind), None, None)
                                                  for kind in (TWO_NORM, INF_NORM, P_NORM)])
NORM_NAMES = {TWO_NORM: "l2", INF_NORM: "linf", P_NORM: "lp"}
# Pointer arguments other than the tables: (element type, element type for fp64 kernels).
POINTER_ARGS = {"steps": ("fp32", "fp32"), "found_inf": ("fp32", "fp32"), "grad_scale": ("fp32", "fp32"),
                "clip_coef": ("fp32", "fp64"), "partials": ("fp32", "fp64"), "schedule": ("fp64", "fp64"),
                "group_step": ("fp32", "fp32"), "rounding_seed": ("i64", "i64")}


@dataclass
class Specialization:
    rule: str
    dtype: str
    aligned: bool
    options: dict
    arguments: tuple = None  # the update kernel's (rule spec, options, per-tensor integer read)

    @property
    def name(self):
        flags = "_".join(NORM_NAMES[v] if k == "NORM" else f"{k.lower()}_{v}" if isinstance(v, str) else k.lower()
                         for k, v in self.options.items() if v is not False) or "plain"
        return f"{self.rule}_{flags}_{self.dtype}_{'aligned' if self.aligned else 'unaligned'}"


def specializations(rules=None, dtypes=None, aligned=(True, False)):
    for rule, (_, option_sets) in KERNEL_OPTIONS.items():
        if rules and rule not in rules:
            continue
        for (options, arguments, only), dtype, is_aligned in itertools.product(option_sets, dtypes or DTYPES, aligned):
            if only is None or dtype in only:
                yield Specialization(rule, dtype, is_aligned, options, arguments)


def compile_specialization(spec, arch):
    """Compile one specialization for sm_<arch>; returns triton's compiled kernel."""
    kernel = KERNEL_OPTIONS[spec.rule][0]
    torch_dtype = DTYPES[spec.dtype]
    constexprs = dict(DTYPE=kernel_dtype(torch_dtype), ALIGNED=spec.aligned, BLOCK=block_size(torch_dtype))
    if spec.arguments is None:
        constexprs.update(spec.options)
    else:
        rule, options, extra = spec.arguments
        update, block_numbers = rule_functions(rule)
        precision, rounding = spec.options["STATES"] or "fp32", spec.options["ROUNDING"] or "nearest"
        param = torch.empty(formats.QUANT_BLOCK, formats.SMALLEST_QUANTIZED, dtype=torch_dtype)
        made = tuple(formats.state_format(precision, param, rule.may_code(options, slot.name)) if present
                     else formats.ABSENT for slot, present in zip(rule.states, rule.present(options)))
        storage = formats.Storage(made, "stochastic" if spec.options["STOCHASTIC_STATES"] else "nearest", rounding)
        constexprs.update({name: value for name, value in spec.options.items() if name in kernel.arg_names},
                          UPDATE=update, BLOCK_NUMBERS=block_numbers, OPTIONS=options,
                          STATES=state_formats(rule, storage), STEPS=rule.steps, EXTRA=extra,
                          PARAM_ROUNDING=PARAM_ROUNDINGS[rounding])
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in TABLE_ARGS:
            signature[name] = "*i64"
        elif name in COUNT_ARGS:
            signature[name] = "i32"
        elif name == "lr" and spec.options.get("LR_TENSOR"):
            signature[name] = "*" + POINTER_ARGS["clip_coef"][torch_dtype == torch.float64]
        elif name == "numbers":  # the rule's Launch NamedTuple of Python floats, as the launcher passes it
            launch = spec.arguments[0].Launch
            signature[name] = launch._make("fp32" for _ in launch._fields)
        elif name in POINTER_ARGS:
            signature[name] = "*" + POINTER_ARGS[name][torch_dtype == torch.float64]
        else:
            signature[name] = "fp32"
    # The tables come from torch's allocator: 16-byte aligned, as the launcher would detect.
    attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in TABLE_ARGS}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": NUM_WARPS})


def widest_access(ptx, op):
    """Widest global load ("ld") or store ("st") in bits, from the PTX."""
    widest = 0
    for vector, bits in re.findall(rf"\b{op}\.global(?:\.[a-z]+)*?(?:\.v(\d))?\.[bfsu](\d+)", ptx):
        widest = max(widest, int(vector or 1) * int(bits))
    return widest


def resource_usage(cubin):
    """(registers, local-memory bytes per thread) read off the cubin with cuobjdump."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        try:
            text = subprocess.run([tool, "--dump-resource-usage", file.name], capture_output=True,
                                  text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            return None, None
    registers = re.search(r"REG:(\d+)", text)
    local = re.search(r"LOCAL:(\d+)", text)
    return int(registers.group(1)), int(local.group(1))


def report(spec, compiled):
    ptx = compiled.asm["ptx"]
    registers, spill_bytes = resource_usage(compiled.asm["cubin"])
    return dict(kernel=spec.name, rule=spec.rule, dtype=spec.dtype, aligned=spec.aligned,
                load_bits=widest_access(ptx, "ld"), store_bits=widest_access(ptx, "st"),
                registers=registers, spill_bytes=spill_bytes)


def parse_arch(text):
    match = re.fullmatch(r"(?:sm_?)?(\d+)", text)
    if not match:
        raise argparse.ArgumentTypeError(f"--arch: expected sm_80, sm_90, ... (got {text!r})")
    return int(match.group(1))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fusedopt.kernels.codegen", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=parse_arch, default=90, help="target, e.g. sm_80 or sm_90 (default sm_90)")
    parser.add_argument("--ptx-dir", help="write each specialization's PTX into this folder")
    parser.add_argument("--rules", help="comma-separated subset of " + ",".join(KERNEL_OPTIONS))
    parser.add_argument("--dtypes", help="comma-separated subset of " + ",".join(DTYPES))
    parser.add_argument("--json", help="also write the table as JSON to this file")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: code generation needs the compiler, not the interpreter")
    rules = args.rules.split(",") if args.rules else None
    dtypes = args.dtypes.split(",") if args.dtypes else None
    if args.ptx_dir:
        os.makedirs(args.ptx_dir, exist_ok=True)
    header = f"{'kernel':<62} {'dtype':<5} {'load bits':>9} {'store bits':>10} {'registers':>9} {'spill bytes':>11}"
    print(f"sm_{args.arch}, triton {triton.__version__}")
    print(header)
    print("-" * len(header))
    rows = []
    for spec in specializations(rules, dtypes):
        compiled = compile_specialization(spec, args.arch)
        row = report(spec, compiled)
        rows.append(row)
        print(f"{row['kernel']:<62} {row['dtype']:<5} {row['load_bits']:>9} {row['store_bits']:>10} "
              f"{row['registers'] if row['registers'] is not None else '?':>9} "
              f"{row['spill_bytes'] if row['spill_bytes'] is not None else '?':>11}")
        if args.ptx_dir:
            with open(os.path.join(args.ptx_dir, f"{spec.name}.sm_{args.arch}.ptx"), "w") as file:
                file.write(compiled.asm["ptx"])
        sys.stdout.flush()
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"arch": f"sm_{args.arch}", "triton": triton.__version__, "kernels": rows}, file, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
