"""A faster Triton interpreter for the tests, with the same semantics."""


def speed_up():
    """Three changes to the Triton interpreter that leave every result as it was (each skipped
    on a Triton that lacks what it changes)."""
    try:
        from triton.runtime import interpreter

        import triton.language as tl
    except ImportError:
        return
    _patch_the_language_once_per_launch(interpreter, tl)
    _skip_overflow_checks_that_assert_nothing(interpreter)
    _look_up_numpy_dtypes_once(interpreter, tl)


def _patch_the_language_once_per_launch(interpreter, tl):
    """The Triton interpreter re-patches triton.language (every member, by inspect.getmembers) at
    each call of a @triton.jit helper inside a kernel: over half the tests' run time, for nothing,
    since the launch has patched the same module objects already. Inside a launch, a helper whose
    language modules (triton.language, triton.language.core) are patched already skips it."""
    try:
        patch_lang, scope_type, grid_call = (interpreter._patch_lang, interpreter._LangPatchScope,
                                             interpreter.GridExecutor.__call__)
    except AttributeError:  # another Triton: leave it as it is
        return
    import inspect

    languages = (tl, tl.core)
    launch = {"patched": None}  # while a launch runs: the language modules patched in it
    modules_of = {}  # helper function -> ids of the language modules among its globals

    def language_modules(fn):
        if fn not in modules_of:
            modules_of[fn] = frozenset(id(value) for value in fn.__globals__.values()
                                       if inspect.ismodule(value) and any(value is language for language in languages))
        return modules_of[fn]

    def run_launch(self, *args, **kwargs):
        launch["patched"] = set()
        try:
            return grid_call(self, *args, **kwargs)
        finally:
            launch["patched"] = None

    def patched_once(fn):
        patched = launch["patched"]
        if patched is not None:
            modules = language_modules(fn)
            if modules <= patched:
                return scope_type()
            patched |= modules
        return patch_lang(fn)

    interpreter.GridExecutor.__call__ = run_launch
    interpreter._patch_lang = patched_once


def _skip_overflow_checks_that_assert_nothing(interpreter):
    """The interpreter checks every 32-bit integer add, sub and mul for overflow by redoing it in
    64 bits (a fifth of the tests' run time), then hands the result to `device_assert`, which
    asserts only when `debug` is on: never in the interpreter, whose options keep the default.
    Off, the check is skipped before it computes anything."""
    import dataclasses

    builder = getattr(interpreter, "interpreter_builder", None)
    options = getattr(builder, "options", None)
    if dataclasses.is_dataclass(options) and not options.debug and getattr(options, "sanitize_overflow", False):
        builder.options = dataclasses.replace(options, sanitize_overflow=False)


def _look_up_numpy_dtypes_once(interpreter, tl):
    """`_get_np_dtype` builds a table of 20 numpy dtypes at each call (about a million calls in the
    suite); the answer depends on the Triton dtype alone."""
    import numpy as np

    table_of = getattr(interpreter, "_get_np_dtype", None)
    if table_of is None:
        return
    answers = {}

    def numpy_dtype(dtype):
        if isinstance(dtype, tl.block_type):
            dtype = dtype.element_ty
        if isinstance(dtype, tl.pointer_type):
            return np.dtype(np.uint64)
        if dtype not in answers:
            answers[dtype] = table_of(dtype)
        return answers[dtype]

    interpreter._get_np_dtype = numpy_dtype
