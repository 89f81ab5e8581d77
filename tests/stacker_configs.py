"""Every stacker configuration ``stack.py`` can build, derived from the code that builds them.

``stack_runs`` builds each stacker as ``make_stacker(m, **stacker_params(m, cfg))`` for the
methods of ``METHODS``; ``stacker_params`` reads a few config options. Walking every method under
the default config and under each choice of every option with a closed set of values (the
``choices`` of its field, or true/false) finds every distinct (method, params) pair, so a new
method, or a new option that reaches a stacker, is covered by the stacker tests without editing
them. Free numeric options (ensemble_size, threads, seed) keep their defaults.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ensemble.stack import METHODS, StackConfig, stacker_params


def _config_variants() -> list[StackConfig]:
    base = StackConfig()
    out = [base]
    for f in dataclasses.fields(StackConfig):
        if f.name == "method":
            continue
        values = f.metadata.get("choices") or ((True, False) if f.type in (bool, "bool")
                                               else ())
        out += [dataclasses.replace(base, **{f.name: v}) for v in values]
    return out


def stack_configurations() -> list[tuple[str, dict[str, Any]]]:
    """(method, params) pairs, each once, in METHODS order: what ``stack.py`` can build."""
    out: list[tuple[str, dict[str, Any]]] = []
    for method in METHODS:
        for cfg in _config_variants():
            pair = (method, stacker_params(method, cfg))
            if pair not in out:
                out.append(pair)
    return out


def config_id(method: str, params: dict[str, Any]) -> str:
    """A short test id: the method and its params."""
    return method + "".join(f"-{k}={v}" for k, v in params.items())
