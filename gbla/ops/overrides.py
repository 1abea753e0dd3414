"""Launch-configuration overrides of the Triton kernels, for benchmarks that compare them side by side.

    with kernel_overrides(parse_overrides("conv.bwd_rows=8,attention.q_block=32")):
        ...   # every kernel launched here takes those settings; the previous ones come back after

Each op whose launch a benchmark may change keeps a CONFIG_OVERRIDE dict in its triton.py (the keys
it reads are listed there); this module names them: "attention" (gbla.ops.attention.triton) and
"conv" (gbla.ops.conv.triton). A key without a namespace is the attention's, as the settings of
`gbla.bench.backend_parity` were written before the conv had overrides ("bwd_scheme=rows"). The
overrides change how a kernel tiles its work, never what it computes beyond rounding order.
"""
from __future__ import annotations

import contextlib
import importlib
from typing import Iterator

# namespace -> the module whose CONFIG_OVERRIDE it sets (imported when used: the kernels need triton)
NAMESPACES = {"attention": "gbla.ops.attention.triton", "conv": "gbla.ops.conv.triton"}
DEFAULT_NAMESPACE = "attention"


def parse_overrides(text: str) -> dict[str, dict]:
    """"conv.bwd_rows=8,q_block=32" -> {"conv": {"bwd_rows": 8}, "attention": {"q_block": 32}}.
    Integers become ints, "true"/"false" bools, anything else stays a string; "" is no override."""
    overrides: dict[str, dict] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"kernel override {item!r} in {text!r}: expected [namespace.]key=value")
        namespace, dot, name = key.rpartition(".")
        namespace = namespace if dot else DEFAULT_NAMESPACE
        if namespace not in NAMESPACES:
            raise ValueError(f"kernel override {item!r} in {text!r}: unknown namespace {namespace!r} "
                             f"(one of {', '.join(sorted(NAMESPACES))})")
        overrides.setdefault(namespace, {})[name] = _value(value)
    return overrides


def _value(text: str):
    if text.lstrip("-").isdigit():
        return int(text)
    return {"true": True, "false": False}.get(text.lower(), text)


def format_overrides(overrides: dict[str, dict]) -> str:
    """The inverse of parse_overrides, namespaces always written: "conv.bwd_rows=8"; "" for none."""
    return ",".join(f"{ns}.{k}={str(v).lower() if isinstance(v, bool) else v}"
                    for ns in sorted(overrides) for k, v in overrides[ns].items())


@contextlib.contextmanager
def overridden(config: dict, values: dict) -> Iterator[None]:
    """One kernels module's CONFIG_OVERRIDE with `values` set inside the block, as it was after (also
    when the block raises)."""
    saved = dict(config)
    config.update(values)
    try:
        yield
    finally:
        config.clear()
        config.update(saved)


@contextlib.contextmanager
def kernel_overrides(overrides: dict[str, dict]) -> Iterator[None]:
    """Apply `overrides` (parse_overrides' result) to the kernels' CONFIG_OVERRIDE dicts inside the
    block; each gets back what it held before. No override imports no kernels."""
    unknown = set(overrides) - set(NAMESPACES)
    if unknown:
        raise ValueError(f"unknown kernel override namespace(s) {sorted(unknown)} (one of {sorted(NAMESPACES)})")
    with contextlib.ExitStack() as stack:
        for namespace, settings in overrides.items():
            if settings:
                module = importlib.import_module(NAMESPACES[namespace])
                stack.enter_context(overridden(module.CONFIG_OVERRIDE, settings))
        yield
