"""Turns a rule into a driver function that applies it to every element.

Numba caches a compiled function on disk only if what it calls are globals of a source
file: a closure over a jitted rule gets a new cache key in every process. So each driver
is generated as source text that names its rule as the global ``rule``.

Numba keys its cache on the driver's file and bytecode, which miss edits to a rule, a
constant or a compiler option. The driver's name therefore carries a hash of everything
it is built from, and an edit gives it a new name and a fresh cache entry.
"""

import functools
import hashlib
import inspect

from . import rules


def state_names(rule):
    """The state arguments of ``rule``: everything between ``p, g`` and ``h``."""
    return tuple(inspect.signature(rule).parameters)[2:-1]


def scalars_type(rule):
    """The named tuple type of ``rule``'s ``h``, which its annotation names."""
    return inspect.signature(rule).parameters["h"].annotation


def plain_tuples(args):
    """``args`` with named tuples (``h``) as plain ones, as kernels take them: Numba
    types a plain tuple argument in C, a named one in Python, at a microsecond a call.
    The kernels turn them back into the rules' named types. (The CUDA launches use
    this; the CPU backend passes ``tuple(h)`` itself, which costs less.)"""
    return [tuple(a) if isinstance(a, tuple) else a for a in args]


@functools.cache
def _rules_source():
    return inspect.getsource(rules)


def build(rule, present, loops, namespace, filename, fingerprint):
    """Define ``<rule>__<present...>__<hash>(p, g, *present, prep, h, ...)`` and return it.

    ``loops`` is the function body: its first line ends the argument list. Its
    ``{body}`` placeholder is the per-element statement, which prepares the gradient with
    ``prepare(p, g, prep)`` and applies the rule. A loop over one chunk of the buffers
    can use ``{slices}``, which binds ``p_c, g_c, ...`` to ``[start:stop]`` of each
    array (``{state_slices}`` binds only the states' ``_c``, for a loop that finds
    ``p_c`` and ``g_c`` elsewhere), and ``{chunk_body}``, the statement on those. A
    state not in ``present`` is passed to the rule as ``ZERO`` and its new value is
    dropped. ``{named}`` binds ``named`` to ``h`` (a plain tuple: see
    :func:`plain_tuples`) as the rule's named type, which the bodies pass to the rule;
    a parallel loop needs it inside its body, where Numba's parfor lowering accepts
    it. ``fingerprint`` is whatever else the compiled code depends on (compiler
    options, constants).
    """
    names = state_names(rule)
    unknown = set(present) - set(names)
    if unknown:
        raise ValueError(f"rule {rule.__name__} has no state {sorted(unknown)}")
    arrays = ("p", "g") + tuple(present)

    def body(suffix):
        loads = "".join(f", {s}{suffix}[i]" if s in present else ", ZERO" for s in names)
        stores = "".join(f", {s}{suffix}[i]" if s in present else ", _" for s in names)
        return (f"p{suffix}[i]{stores} = "
                f"rule(p{suffix}[i], prepare(p{suffix}[i], g{suffix}[i], prep){loads}, named)")

    namespace["Scalars"] = scalars_type(rule)
    fields = len(namespace["Scalars"]._fields)
    named = f"named = Scalars({', '.join(f'h[{i}]' for i in range(fields))})"
    slices = "; ".join(f"{a}_c = {a}[start:stop]" for a in arrays)
    state_slices = "; ".join(f"{a}_c = {a}[start:stop]" for a in present) or "pass"
    text = loops.format(body=body(""), chunk_body=body("_c"), slices=slices,
                        state_slices=state_slices, named=named)
    digest = hashlib.sha1((_rules_source() + text + fingerprint).encode()).hexdigest()
    name = "__".join((rule.__name__,) + tuple(present) + (digest[:10],))
    args = ", ".join(arrays + ("prep", "h"))
    source = f"def {name}({args}{text}"
    exec(compile(source, filename, "exec"), namespace)
    return namespace[name]
