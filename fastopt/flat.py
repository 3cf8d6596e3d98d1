"""Flattening: many parameter arrays become one contiguous buffer (float32, or 16-bit).

The optimizer owns the buffer and hands out views of it, so a kernel sees one array and
makes one pass, whatever the number of parameter tensors.
"""

import numbers
from dataclasses import dataclass

import numpy as np

from ._backend import FLOAT32, backend_of, is_c_contiguous, is_cuda_array
from .precision import grads_dtype, name_of


@dataclass(frozen=True)
class Layout:
    """Where each parameter lives in the flat buffer.

    ``keys`` are the dict keys of the parameters, or None when they came as a list.
    The parameters fill ``flat[start:stop]``; with parameter groups each group has a
    layout, and ``prefix`` names the group's parameters in messages.
    """

    keys: tuple | None
    shapes: tuple
    offsets: tuple
    size: int
    start: int = 0
    prefix: str = "params"

    @classmethod
    def of(cls, keys, shapes, start=0, prefix="params"):
        shapes = tuple(tuple(int(d) for d in s) for s in shapes)
        sizes = [_size(s) for s in shapes]
        offsets = tuple(int(o) for o in np.cumsum([start] + sizes[:-1]))
        return cls(keys, shapes, offsets, sum(sizes), start, prefix)

    @property
    def stop(self):
        return self.start + self.size

    def names(self):
        return param_names(self.keys, len(self.shapes), self.prefix)

    def slices(self, flat):
        """1-D slices of ``flat``, one per parameter."""
        return [flat[o:o + _size(s)] for o, s in zip(self.offsets, self.shapes)]

    def views(self, flat, name="params"):
        """Views of ``flat`` shaped like the parameters, in the parameters' structure (a
        read-only :class:`Views` dict or :class:`ViewList`, called ``name`` in errors)."""
        views = [s.reshape(shape) for s, shape in zip(self.slices(flat), self.shapes)]
        if self.keys is None:
            return ViewList(views, name)
        return Views(zip(self.keys, views), name)


def _refuse(self, *args, **kwargs):
    path, inner = f"opt.{self.name}", self
    while isinstance(inner, (Views, ViewList)) and len(inner):  # down to a first view
        key = next(iter(inner)) if isinstance(inner, dict) else 0
        path, inner = f"{path}[{key!r}]", inner[key]
    raise TypeError(f"opt.{self.name} is read-only: its arrays are views of the flat buffer "
                    "that the optimizer steps, so an array put in their place would be "
                    f"silently ignored. Write into a view instead: {path}[...] = array")


class Views(dict):
    """A read-only dict of views (``opt.params``, ``opt.grads``): rebinding an entry
    raises a TypeError that says to write into the view instead."""

    def __init__(self, items=(), name="params"):
        super().__init__(items)
        self.name = name

    __setitem__ = __delitem__ = __ior__ = update = setdefault = pop = popitem = clear = _refuse

    def __reduce__(self):  # copy and pickle through __init__, not item assignment
        return type(self), (dict(self), self.name)


class ViewList(list):
    """A read-only list of views; see :class:`Views`."""

    def __init__(self, items=(), name="params"):
        super().__init__(items)
        self.name = name

    __setitem__ = __delitem__ = __iadd__ = __imul__ = _refuse
    append = extend = insert = pop = remove = clear = sort = reverse = _refuse

    def __reduce__(self):
        return type(self), (list(self), self.name)


def param_names(keys, count, prefix="params"):
    """How parameters are named in messages: ``params['w']`` or ``params[0]``."""
    if keys is None:
        return [f"{prefix}[{i}]" for i in range(count)]
    return [f"{prefix}[{k!r}]" for k in keys]


def _size(shape):
    return int(np.prod(shape, dtype=np.int64))


@dataclass(frozen=True)
class Adopted:
    """A buffer the optimizer uses in place; made by :func:`adopt`."""

    buffer: object
    shapes: object = None
    grads: object = None


def adopt(buffer, shapes=None, *, grads=None):
    """Let an optimizer use ``buffer`` as its parameters, without copying.

    ``buffer`` must be a 1-D, C-contiguous, writeable float32, bfloat16 or float16 array
    (NumPy or CUDA).
    The optimizer updates it in place, so every view the caller holds stays live.
    ``shapes`` gives ``opt.params`` and ``opt.grads`` a structure; the sizes must add up
    to ``buffer.size``:

    - None: one tensor, the whole buffer (``opt.params == [buffer]``);
    - a tuple of ints, such as ``(2, 2)``: ONE tensor of that shape (``opt.params`` is
      a one-element list), as NumPy reads a shape;
    - a list of shapes, such as ``[(2, 3), (4,)]``: one tensor per shape (an int inside
      the list means a 1-D shape);
    - a dict of name -> shape (a tuple, or an int for 1-D): named tensors.

    A list of several ints, ``[2, 2]``, is refused as ambiguous: write ``(2, 2)`` for one
    2x2 tensor or ``[(2,), (2,)]`` for two vectors. ``grads``, a buffer like
    ``buffer``, is adopted as ``opt.flat_grads`` too; otherwise one is allocated::

        flat = np.zeros(1000, np.float32)
        opt = fastopt.Adam(fastopt.adopt(flat, {"w": (10, 90), "b": (100,)}))
        opt.params["w"].base is flat  # True
    """
    return Adopted(buffer, shapes, grads)


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _shape(what, shape):
    """``shape`` as a tuple of non-negative ints (an int means a 1-D shape)."""
    dims = (shape,) if _is_int(shape) else shape
    if not isinstance(dims, (tuple, list)) or not all(map(_is_int, dims)):
        raise TypeError(f"{what} must be a tuple of ints, got {shape!r}")
    if any(d < 0 for d in dims):
        raise ValueError(f"{what} has a negative dimension: {shape!r}")
    return tuple(int(d) for d in dims)


def _check_flat(backend, x, what, size=None, dtype=None):
    a = backend.asarray(x, what)
    check_dtype(a, what, dtype)
    if a.ndim != 1 or not is_c_contiguous(a):
        raise ValueError(f"{what} must be a 1-D C-contiguous array, got shape {a.shape}"
                         + ("" if a.ndim != 1 else " with strides"))
    if not backend.is_writeable(x):
        raise ValueError(f"{what} must be writeable")
    if size is not None and a.size != size:
        raise ValueError(f"{what} must have {size} elements, got {a.size}")
    return a


def check_dtype(a, what, dtype=None):
    """Raise TypeError unless ``a`` has ``dtype`` (None: a format of
    ``precision.DTYPES``)."""
    if dtype is not None and a.dtype != dtype:
        raise TypeError(f"{what} must be {name_of(dtype)}, got {a.dtype}")
    if name_of(a.dtype) is None:
        raise TypeError(f"{what} has dtype {a.dtype}; fastopt steps float32, bfloat16 "
                        "(ml_dtypes) and float16 arrays (convert with "
                        ".astype(np.float32))")


def flatten(groups, grouped=False, grad_dtype=None):
    """``(backend, layouts, flat_params, flat_grads)`` for the parameters of each group.

    ``groups`` lists one structure per parameter group (a dict or list of arrays), or
    holds one :func:`adopt` result; ``grouped`` says they came as group dicts, which
    names them ``params[i]...`` in messages. The arrays are copied into one new buffer,
    group after group, so each group is a contiguous segment with its own layout. All
    parameters share one dtype (float32, bfloat16 or float16), which the buffer takes;
    the gradients' buffer takes ``grad_dtype`` (a name of ``precision.DTYPES``; None:
    the parameters'). Raises TypeError/ValueError naming the offending parameter; the
    inputs are never modified.
    """
    if not grouped and isinstance(groups[0], Adopted):
        return _adopt(groups[0], grad_dtype)
    prefixes = [f"params[{i}]" for i in range(len(groups))] if grouped else ["params"]
    structures = [_structure(prefix, params) for prefix, params in zip(prefixes, groups)]
    if not any(arrays for _, _, arrays in structures):
        raise ValueError("params is empty: give the optimizer at least one array")
    first_name, first = next((names[0], arrays[0]) for names, _, arrays in structures if arrays)
    backend = backend_of(first)
    dtype = backend.asarray(first, first_name).dtype
    seen = {}
    layouts, views = [], []
    for prefix, (names, keys, arrays) in zip(prefixes, structures):
        group_views = []
        for name, x in zip(names, arrays):
            if is_cuda_array(x) != (backend.device == "cuda"):
                raise TypeError(f"{name} and {first_name} are on different devices; all "
                                "parameters must be NumPy arrays, or all CUDA arrays")
            if id(x) in seen:
                raise ValueError(f"{name} is the same array as {seen[id(x)]}; "
                                 "each parameter may appear only once")
            seen[id(x)] = name
            a = backend.asarray(x, name)
            check_dtype(a, name)
            if a.dtype != dtype:
                raise TypeError(f"{name} is {a.dtype} but {first_name} is {dtype}: the "
                                "parameters of one optimizer share a dtype (mixing is not "
                                "supported yet; give each dtype its own optimizer)")
            group_views.append(a)
        start = layouts[-1].stop if layouts else 0
        layouts.append(Layout.of(keys, [a.shape for a in group_views], start, prefix))
        views += group_views
    size = layouts[-1].stop
    flat_params = backend.zeros(size, dtype)
    slices = [s for layout in layouts for s in layout.slices(flat_params)]
    for destination, source in zip(slices, views):
        backend.copy(destination, source)
    return backend, layouts, flat_params, backend.zeros(size, grads_dtype(dtype, grad_dtype))


def _structure(prefix, params):
    """``(names, keys, arrays)`` of one group's parameters, a dict or list of arrays."""
    if isinstance(params, dict):
        keys, arrays = tuple(params), list(params.values())
    elif isinstance(params, (list, tuple)):
        keys, arrays = None, list(params)
    elif isinstance(params, Adopted):
        raise TypeError(f"{prefix} must be a dict or list of arrays: an adopted buffer "
                        "cannot be split into parameter groups")
    else:
        raise TypeError(f"{prefix} must be a dict of arrays or a list of arrays, got "
                        f"{type(params).__name__}; to optimize one array, pass [array] "
                        "(copied) or fastopt.adopt(array)")
    return param_names(keys, len(arrays), prefix), keys, arrays


def _adopt(adopted, grad_dtype):
    backend = backend_of(adopted.buffer)
    flat_params = _check_flat(backend, adopted.buffer, "adopted buffer")
    shapes = adopted.shapes
    if shapes is None:
        layout = Layout.of(None, [flat_params.shape])
    elif isinstance(shapes, dict):
        layout = Layout.of(tuple(shapes), [_shape(f"shapes[{k!r}]", s) for k, s in shapes.items()])
    elif isinstance(shapes, tuple) and all(map(_is_int, shapes)):
        layout = Layout.of(None, [_shape("shapes", shapes)])  # one tensor, as NumPy reads it
    elif isinstance(shapes, list) and len(shapes) > 1 and all(map(_is_int, shapes)):
        raise TypeError(f"shapes={shapes!r} is ambiguous: write {tuple(shapes)!r} for one "
                        f"tensor of that shape, or {[(d,) for d in shapes]!r} for "
                        f"{len(shapes)} vectors")
    elif isinstance(shapes, (list, tuple)):
        layout = Layout.of(None, [_shape(f"shapes[{i}]", s) for i, s in enumerate(shapes)])
    else:
        raise TypeError("shapes must be a shape tuple, a list of shapes or a dict of shapes, "
                        f"got {type(shapes).__name__}")
    if layout.size != flat_params.size:
        raise ValueError(f"shapes add up to {layout.size} elements but the adopted "
                         f"buffer has {flat_params.size}")
    dtype = grads_dtype(flat_params.dtype, grad_dtype)
    if adopted.grads is None:
        flat_grads = backend.zeros(layout.size, dtype)
    else:
        flat_grads = _check_flat(backend, adopted.grads, "adopted grads", layout.size, dtype)
        if backend.overlaps(flat_grads, flat_params):
            raise ValueError("adopted grads must not share memory with the adopted buffer")
    return backend, [layout], flat_params, flat_grads
