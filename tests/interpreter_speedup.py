"""A faster Triton interpreter for the tests, with the same semantics."""


def patch_the_language_once_per_launch():
    """The Triton interpreter re-patches triton.language (every member, by inspect.getmembers) at
    each call of a @triton.jit helper inside a kernel: over half the tests' run time, for nothing,
    since the launch has patched the same module objects already. Inside a launch, skip it."""
    try:
        from triton.runtime import interpreter

        patch_lang, scope_type, grid_call = (interpreter._patch_lang, interpreter._LangPatchScope,
                                             interpreter.GridExecutor.__call__)
    except (ImportError, AttributeError):  # another Triton: leave it as it is
        return
    launch = {"running": False, "patched": False}

    def run_launch(self, *args, **kwargs):
        launch["running"], launch["patched"] = True, False
        try:
            return grid_call(self, *args, **kwargs)
        finally:
            launch["running"], launch["patched"] = False, False

    def patched_once(fn):
        if launch["running"] and launch["patched"]:
            return scope_type()
        launch["patched"] = launch["running"]
        return patch_lang(fn)

    interpreter.GridExecutor.__call__ = run_launch
    interpreter._patch_lang = patched_once

