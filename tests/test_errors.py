"""One error hierarchy, drawn in errors.py's docstring and exported whole."""

from __future__ import annotations

import inspect

import convo
from convo import errors


def _error_classes() -> list[type[BaseException]]:
    return [
        value
        for value in vars(errors).values()
        if inspect.isclass(value) and issubclass(value, errors.ConvoError)
    ]


def test_every_error_is_in_the_tree_and_exported() -> None:
    assert errors.__doc__ is not None
    for cls in _error_classes():
        assert f" {cls.__name__}\n" in errors.__doc__ or f" {cls.__name__} " in errors.__doc__, cls
        assert cls.__name__ in convo.__all__, cls
        assert getattr(convo, cls.__name__) is cls
    assert sorted(errors.__all__) == sorted(c.__name__ for c in _error_classes())


def test_the_drawn_parents_are_the_real_ones() -> None:
    assert errors.__doc__ is not None
    lines = [line for line in errors.__doc__.splitlines() if "─ " in line]
    stack: list[tuple[int, str]] = [(-1, "ConvoError")]
    for line in lines:
        depth = line.index("─ ")
        name = line[depth + 2 :].split()[0]
        while stack and stack[-1][0] >= depth:
            stack.pop()
        parent = getattr(errors, stack[-1][1])
        assert issubclass(getattr(errors, name), parent), (name, parent)
        stack.append((depth, name))


def test_input_errors_are_value_errors() -> None:
    assert issubclass(errors.InvalidInput, ValueError)
    assert issubclass(errors.MessageTooLarge, ValueError)
    assert issubclass(errors.ConversationNotFound, LookupError)
