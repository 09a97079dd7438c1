"""optimizer.state as dicts that count their changes: while the count has not moved, no param's
state was added, replaced or removed and no entry of one was set or deleted, so a step can skip
looking up every param's state to see that its tensor tables still name the state it holds.

The count covers every such dict in the process. Dicts put in by hand (a plain ``dict`` as a
param's state, or a plain ``defaultdict`` as ``optimizer.state``) are not counted, and the tables
built on them are checked entry by entry at every step instead.
"""
from collections import defaultdict

_changes = 0


def state_changes():
    """How many changes counted state dicts have seen in this process."""
    return _changes


def _count():
    global _changes
    _changes += 1


class _Counted:
    """dict's mutators, each counting a change first."""

    def __setitem__(self, key, value):
        _count()
        super().__setitem__(key, value)

    def __delitem__(self, key):
        _count()
        super().__delitem__(key)

    def __ior__(self, other):
        _count()
        return super().__ior__(other)

    def clear(self):
        _count()
        super().clear()

    def pop(self, *args):
        _count()
        return super().pop(*args)

    def popitem(self):
        _count()
        return super().popitem()

    def setdefault(self, key, default=None):
        _count()
        return super().setdefault(key, default)

    def update(self, *args, **kwargs):
        _count()
        super().update(*args, **kwargs)


class ParamState(_Counted, dict):
    """One param's state (torch.optim's dict of step and state tensors). state_dict() hands out
    plain dicts, so that checkpoints load with weights_only=True and without fusedopt."""


class OptimizerState(_Counted, defaultdict):
    """optimizer.state: param -> ParamState, created on first access, as torch's defaultdict(dict)."""

    def __init__(self, items=()):
        super().__init__(ParamState)
        for param, values in dict(items).items():
            super().__setitem__(param, ParamState(values) if type(values) is dict else values)

    def __reduce__(self):
        return OptimizerState, (dict(self),)


def plain(state):
    """A state_dict's "state" with plain dicts for ParamStates."""
    return {key: dict(values) if type(values) is ParamState else values for key, values in state.items()}


def counted(state):
    """`state` (a mapping param -> dict of state) as an OptimizerState of ParamStates."""
    return state if type(state) is OptimizerState else OptimizerState(state)


def is_counted(state, params):
    """Whether `state` and the state dicts of `params` all count their changes."""
    return type(state) is OptimizerState and all(type(state.get(p)) is ParamState for p in params)
