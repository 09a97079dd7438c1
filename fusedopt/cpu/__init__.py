"""The numba CPU backend: a TensorTable (fusedopt.tables) whose step() runs the rule's numba kernel
(one parallel pass over every block of every tensor of a bucket), found by the rule's spec.

Imported when a CPU bucket is first planned, not by `import fusedopt`; numba itself is imported
by `available()`. Needs no Triton. Where numba is missing or cannot compile, one warning and the
reference path.
"""
import contextlib
import os
import sys
import threading
import time
import warnings

import numpy as np
import torch

from .. import formats, tables

# Elements per block (a prange task): at least CPU_BLOCK, so that two threads have enough tasks
# on a set of 4K tensors; doubled up to MAX_CPU_BLOCK while every thread keeps BLOCKS_PER_THREAD
# blocks, because each block costs its table reads and its tensor's numbers (with blocks of 4096,
# about 8% of a step over one 8M tensor; 2-3% with blocks of 65536).
CPU_BLOCK = 4096
MAX_CPU_BLOCK = 65536
assert CPU_BLOCK % formats.QUANT_BLOCK == 0  # a block holds whole 8-bit groups (kernels.walk_block)
BLOCKS_PER_THREAD = 32


def cpu_block(elements, threads):
    """The block size of a bucket of `elements` elements walked by `threads` threads."""
    block = CPU_BLOCK
    while block < MAX_CPU_BLOCK and elements >= 2 * block * threads * BLOCKS_PER_THREAD:
        block *= 2
    return block

# The numba array dtype each param dtype is walked as: 16-bit floats as integers (numba has no
# float16 type), widened and rounded by bit operations.
STORAGE = {torch.float32: np.float32, torch.float64: np.float64, torch.bfloat16: np.uint16, torch.float16: np.int16}
LIKE = {dtype: np.empty(0, storage) for dtype, storage in STORAGE.items()}
# The master's array of each param rounding: fp32 copies, 16-bit remainders (none otherwise)
MASTER_LIKE = {"nearest": np.empty(0, np.float32), "stochastic": np.empty(0, np.float32),
               "master": np.empty(0, np.float32), "remainder": np.empty(0, np.int16)}
NO_STEPS = np.zeros(1, np.float32)  # the steps of rules without: the dtype of torch's step counts

_kernels = None  # fusedopt.cpu.kernels once imported; False where numba is unusable
# One launch at a time: numba's workqueue layer (where neither OpenMP nor TBB loads) aborts the
# process when two threads enter parallel code at once; each launch uses every thread anyway.
_launch_lock = threading.Lock()
_checked = {}  # (rule, options, rounding, dtype): whether its kernel compiled
_numba_threads = threading.local()  # .follows: the torch thread count this thread's numba count was set from


def _warn(reason):
    warnings.warn(f"fusedopt: the numba CPU kernels are unavailable ({reason}); CPU params use the plain-torch "
                  "reference", RuntimeWarning, stacklevel=4)


def _choose_threading_layer(numba):
    """OpenMP first: torch's CPU ops run on OpenMP, and numba's omp layer shares its runtime, so
    neither pool slows the other (bench/cpu_threads.py measures it). A layer the user chose
    (NUMBA_THREADING_LAYER) stays."""
    if "NUMBA_THREADING_LAYER" in os.environ or numba.config.THREADING_LAYER != "default":
        return
    numba.config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]


def kernel_module():
    """fusedopt.cpu.kernels, or None (with one warning) where numba cannot be imported."""
    global _kernels
    if _kernels is None:
        try:
            import numba

            _choose_threading_layer(numba)
            from . import kernels
            _kernels = kernels
        except Exception as error:  # ImportError, or a numba that fails on import
            _warn(f"{type(error).__name__}: {error}")
            _kernels = False
    return _kernels or None


def available():
    return kernel_module() is not None


def use_torch_threads():
    """At most torch's thread count for numba's parallel loops (numba's count is the calling
    thread's own: it is set once per thread and per change of torch's)."""
    torch_threads = torch.get_num_threads()
    if getattr(_numba_threads, "follows", None) != torch_threads:
        import numba

        numba.set_num_threads(min(torch_threads, numba.config.NUMBA_NUM_THREADS))
        if torch.get_num_threads() != torch_threads:
            # numba's OpenMP layer, starting its threads, set the OpenMP count torch shares with it
            torch.set_num_threads(torch_threads)
        _numba_threads.follows = torch_threads


class CpuTensorTable(tables.TensorTable):
    """The tensor table of a CPU bucket: the same rows of sizes and addresses and the same block
    map as the Triton kernels', walked by the numba kernels through numpy views of its host
    tables (the grad row, re-pointed in place, is seen at once)."""

    walks_cpu_tensors = True
    cpu_kernels = True
    counts_steps = True  # the kernel adds the step to the step counts (in compiled code: a torch op
    # after a pass over a large bucket, its caches cold, costs tens of microseconds)

    def block_size(self, dtype):
        return cpu_block(self._elements, torch.get_num_threads())

    def __init__(self, params, grads, states, extra=None):
        self._elements = sum(p.numel() * (2 if p.is_complex() else 1) for p in params)
        super().__init__(params, grads, states, extra)
        self.table_array = self._host_table.numpy()
        self.block_array = self.host_block_table.numpy()
        self.like = LIKE[self.dtype]
        self._steps = self._step_counts = None

    @classmethod
    def ready(cls, spec, options, storage, dtype):
        """Whether the rule's kernel runs on `dtype` tables: compiled (or loaded from numba's cache)
        now, before any state is touched; one warning and False where it fails."""
        return kernel_ready(spec, options, storage, dtype)

    def grads_moved(self):
        """Nothing to upload: the kernels read the grad row, re-pointed in place, through
        `table_array`, and align nothing. (No torch op: after zero_grad(set_to_none=True), the grads
        move at every step, and a torch op there costs tens of microseconds with cold caches.)"""

    def step_counts(self, steps):
        """A numpy view of the bucket's step count buffer, made once per buffer."""
        if steps is not self._steps:
            self._steps, self._step_counts = steps, steps.numpy()
        return self._step_counts

    def step(self, spec, numbers, options, storage, *, lr, steps=None, fresh=False, scaling=None, group_step=None):
        """fusedopt.tables.TensorTable.step, on the CPU: the launch's numbers are read on the host
        (the tensors are in host memory; there is nothing to synchronise) and the rule's numba
        kernel makes one parallel pass over the table's blocks, after adding this step to `steps`
        (the counts before it: TensorTable.counts_steps), unless AMP skips the step."""
        kernel = kernel_module().kernel_for(spec, options, storage)
        tables.count_launch()
        arguments = (self.table_array, self.block_array, self.block, self.like, MASTER_LIKE[storage.param_rounding],
                     NO_STEPS if steps is None else self.step_counts(steps),
                     launch_numbers(self, lr, scaling, group_step),
                     np.fromiter(map(float, numbers), np.float64, len(numbers)),  # the Launch's fields, in order
                     launch_flags(storage, group_step, steps is not None, fresh))
        self._last_launch = kernel, arguments
        run(kernel, arguments)

    def relaunch(self):
        """The last launch again, with the same numbers (KernelBucket.launch asks where nothing
        they were computed from has changed)."""
        tables.count_launch()
        run(*self._last_launch)

    def grad_norm_partials(self, norm_type, grad_scale, block_groups, groups):
        """One launch of the grad-norm reduction (fusedopt.cpu.grad_norm) over the table's grads,
        each divided by `grad_scale` (a one-element tensor, or None) first: a float64 array of
        shape (2, groups), per norm group its sum of |g|^p (max |g| for the inf norm) and its
        number of non-finite grads; `block_groups`, each block's norm group (an empty array: one
        group). 1/scale is rounded to fp32 from a double reciprocal, as GradScaler.unscale_ does."""
        from . import grad_norm

        inv_scale = 1.0 if grad_scale is None else float(np.float32(1.0 / float(grad_scale)))
        tables.count_launch()
        return run(grad_norm.grad_norm_kernel_compiled(), (
            self.table_array, self.block_array, self.block, self.like, inv_scale, float(norm_type),
            grad_norm.norm_kind(norm_type), block_groups, groups))


def run(kernel, arguments):
    """Run a numba kernel on at most torch's thread count, one launch at a time; its result."""
    with _launch_lock:
        use_torch_threads()
        return kernel(*arguments)


def launch_numbers(table, lr, scaling, group_step):
    """[skip, 1/scale, clip factor, lr, lr read from memory] as the kernels read them: 1/scale
    rounded to fp32 from a double reciprocal (GradScaler.unscale_), a tensor lr's value, times a
    schedule's factor at the group's count (the last one held)."""
    skip, inv_scale, clip = 0.0, 1.0, 1.0
    if scaling is not None:
        found_inf, grad_scale, clip_coef = scaling
        skip = 0.0 if found_inf is None else float(found_inf)
        inv_scale = 1.0 if grad_scale is None else float(np.float32(1.0 / float(grad_scale)))
        clip = 1.0 if clip_coef is None else float(clip_coef)
    from_memory = table.lr_in_memory(lr)
    lr = float(lr)
    factors = None if group_step is None else group_step.factors
    if factors is not None:
        length = factors.numel()
        index = int(max(min(float(group_step.count), length) - 1, 0))
        lr = lr * float(factors[index])
    return np.array([skip, inv_scale, clip, lr, float(from_memory or factors is not None)], dtype=np.float64)


def launch_flags(storage, group_step, counts_steps, reads_extra):
    """[counts (and reads) steps, reads per-tensor integers, rounding seed, group step count]."""
    seed = count = 0
    if storage.param_rounding == "stochastic" or storage.state_rounding == "stochastic":
        seed, count = int(group_step.rounding_seed), int(float(group_step.count))
    return np.array([int(counts_steps), int(reads_extra), seed, count], dtype=np.int64)


def probe_arguments(spec, storage, dtype):
    """Arguments of a launch over no blocks, of the types a `dtype` bucket's launch has: running
    the kernel on them compiles it (or loads it from the cache) and touches nothing."""
    table = np.zeros((tables.FIRST_STATE_ROW + 2 * len(spec.states) + 1, 1), dtype=np.int64)
    return (table, np.zeros((2, 0), dtype=np.int64), CPU_BLOCK, LIKE[dtype], MASTER_LIKE[storage.param_rounding],
            NO_STEPS, np.zeros(5), np.zeros(len(spec.Launch._fields)), np.zeros(4, dtype=np.int64))


# Whether a kernel's first compilation in this process prints its line (python -m fusedopt.cpu's
# workers report their progress their own way)
announce_compiles = True


def dtype_name(dtype):
    return str(dtype).replace("torch.", "")


@contextlib.contextmanager
def compile_announced(kernel, what, ahead=True):
    """While the block runs: where numba compiles `kernel` (a dispatcher; not where it loads it
    from its cache), one line on stderr that says so, why, how long it took and, where `python -m
    fusedopt.cpu` compiles it (`ahead`), how to do it ahead. Nothing else: the user's loop stays
    quiet."""
    if not announce_compiles:
        yield
        return
    from numba.core import event

    class Announce(event.Listener):
        started = None

        def on_start(self, ev):
            if ev.data["dispatcher"] is kernel and self.started is None:
                self.started = time.perf_counter()
                hint = " (`python -m fusedopt.cpu` compiles it ahead)" if ahead else ""
                print(f"fusedopt: compiling {what} at its first use, once: numba keeps it in its on-disk cache"
                      f"{hint} ...", end="", file=sys.stderr, flush=True)

        def on_end(self, ev):
            if ev.data["dispatcher"] is kernel and self.started is not None:
                print(f" {time.perf_counter() - self.started:.1f} s", file=sys.stderr, flush=True)

    with event.install_listener("numba:compile", Announce()):
        yield


def kernel_ready(spec, options, storage, dtype):
    """Whether the kernel of `spec` under `options` for buckets stored as `storage`
    (fusedopt.formats.Storage) runs on `dtype` tables: compiled (or loaded from numba's cache)
    now; one warning and False where it fails."""
    if kernel_module() is None:
        return False
    key = (spec.update, options, storage, dtype)
    if key in _checked:
        return _checked[key]
    from . import precompile

    kernel = kernel_module().kernel_for(spec, options, storage)
    present = [fmt for fmt in storage.states if fmt != formats.ABSENT]
    states = ", ".join(name if fmt == formats.PLAIN else f"{name} in {fmt}"
                       for name, fmt in zip(spec.state_names(options), present))
    rounded = f", {storage.param_rounding} rounding" if dtype == torch.bfloat16 else ""
    try:
        with compile_announced(kernel, f"the CPU kernel of {spec.name}{f' ({states})' if states else ''} for "
                                       f"{dtype_name(dtype)} params{rounded}", precompile.covers(storage)):
            run(kernel, probe_arguments(spec, storage, dtype))
    except Exception as error:  # a numba typing or lowering error: this rule and dtype use the reference
        _checked[key] = False
        _warn(f"{spec.name} ({', '.join(spec.state_names(options)) or 'no state'}; {storage}) on {dtype} did not "
              f"compile: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
        return False
    _checked[key] = True
    return True


def grad_norm_ready(dtype):
    """Whether the grad-norm reduction runs on `dtype` tables: compiled (or loaded from numba's
    cache) now; one warning and False where it fails (the grads' norms are then torch's)."""
    if kernel_module() is None:
        return False
    key = ("grad_norm", dtype)
    if key in _checked:
        return _checked[key]
    from . import grad_norm

    kernel = grad_norm.grad_norm_kernel_compiled()
    try:
        with compile_announced(kernel, f"the CPU grad-norm reduction for {dtype_name(dtype)} grads"):
            run(kernel, (np.zeros((tables.FIRST_STATE_ROW, 1), dtype=np.int64), np.zeros((2, 0), dtype=np.int64),
                         CPU_BLOCK, LIKE[dtype], 1.0, 2.0, grad_norm.TWO_NORM, np.zeros(0, dtype=np.int64), 1))
    except Exception as error:  # a numba typing or lowering error: torch's norms for these grads
        _checked[key] = False
        warnings.warn(f"fusedopt: the numba grad-norm reduction did not compile for {dtype} grads "
                      f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); their norms are "
                      "computed with torch ops", RuntimeWarning, stacklevel=4)
        return False
    _checked[key] = True
    return True


__all__ = ["CpuTensorTable", "available", "kernel_ready", "grad_norm_ready", "kernel_module", "CPU_BLOCK"]
