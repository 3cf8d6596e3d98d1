"""Turns a rule into a driver function that applies it to every element.

A pass of a rule over the buffers is described by a :class:`Pass`: which state buffers
the caller holds, which of the rule's results it stores, which it sums per segment,
whether it reads the gradient, and which scalars come per segment. Every driver, CPU or
CUDA, single pass or one of several, is generated from that, so a rule is the only
place an algorithm's math lives.

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
from typing import NamedTuple

import numpy as np
from numba import float32

from . import codecs, rules

# The tensors a rule takes, which may lie anywhere.
TENSORS = ("p", "g")
# The buffers that segment drivers reach through each segment's own start: the tensors
# and the master weights ``w``, laid out like them (Adafactor's state is not); the others
# are flat state buffers, reached through ``state_starts``.
ADDRESSED = TENSORS + ("w",)

# What one segment pass can sum and take per segment, at most (the width of the
# backends' partials and per-segment scalars).
MAX_SUMS = MAX_PER_SEGMENT = 2

FLOAT32 = np.dtype(np.float32)

# The format of master weights ``w`` kept as the low halves of their float32 bits, which
# with the bfloat16 ``p`` rebuild them (``codecs.bfloat16_rebuild``).
REMAINDER = "remainder"

# The elements of a segment that one CPU thread or one CUDA block takes at a time.
SEGMENT_CHUNK = 1 << 14

# The constants the generated code names, the same in every backend's driver (which adds
# the integer ones of its lanes, NO_BITS and MAGNITUDE).
CONSTANTS = {"ZERO": np.float32(0),  # a state a driver does not hold reads as this
             "ONE": np.float32(1),
             "INFINITY": np.float32(np.inf),
             "NOT_A_NUMBER": np.float32(np.nan),
             "BLOCK": codecs.BLOCK,
             "LARGEST_PLAIN_ABSMAX": codecs.LARGEST_PLAIN_ABSMAX,
             "PRESCALE": codecs.PRESCALE,
             "SMALLEST_PLAIN_ABSMAX": codecs.SMALLEST_PLAIN_ABSMAX,
             "SUBNORMAL_PRESCALE": codecs.SUBNORMAL_PRESCALE}


class Pass(NamedTuple):
    """One pass of ``rule`` (its name in ``kernels.rules``) over the buffers.

    ``present`` names the state buffers the caller holds, in the rule's order; the
    others read as 0 and their new values are dropped. ``writes`` names the results
    stored (None: every buffer the rule returns that is present, ``p`` included);
    ``sums`` names float64 results summed per segment (see :func:`rules.returns`).
    With ``grad`` False the rule's ``g`` reads as 0 and no gradient is loaded.
    ``per_segment`` names fields of the rule's scalars that each segment takes from
    its own row of ``row_scalars`` (LAMB's trust ratio), in that row's order. A rule's
    ``caution`` holds only in a pass that takes ``caution_scale`` per segment; in every
    other pass it is False, whatever ``h`` says.

    ``formats`` stores buffers in fewer bits: ``(name, format)`` pairs, a format of
    ``codecs.CODECS`` (16 bits, whose array holds the bits, ``codecs.BITS``) or, for
    state, of ``codecs.QUANTIZED`` (uint8 codes, in blocks with a scale each: see
    :func:`_block_chunk`); the rule reads and writes float32 through the codec. With
    ``master``, the driver also takes ``w``, a float32 copy of the 16-bit ``p`` (master
    weights): the rule reads ``w`` as its ``p``, and the new value goes to ``w`` and,
    rounded, to ``p`` (in a segment pass ``w`` is reached as ``p`` is, through each
    segment's start).
    Where ``p`` no longer holds ``w`` rounded, someone wrote into it since the last
    step, and the rule reads ``p`` instead: a write is never lost. The format
    ``("w", REMAINDER)`` keeps only the low 16 bits of the master weights, for a
    bfloat16 ``p`` rounded with ties away from zero, which rebuilds them exactly
    (``codecs.bfloat16_rebuild``; a write into ``p`` then reads as ``p`` plus the
    remainder: within half a bfloat16 step of what was written). With ``stochastic``,
    the 16-bit stores (but ``p``'s to master weights' rounding) round stochastically,
    on ``codecs.random_bits`` of ``key`` and the index ``first + index``: the driver takes
    ``key`` and ``first`` (the index of its first element) before ``parallel``; a
    segment pass indexes each chunk's elements from its ``draw``
    (``fastopt._backend.segment_chunks``), a pass over blocks of 8-bit state from their
    state's place.

    ``flushes`` says that the driver will run with subnormal numbers flushed (its
    ``flush_denormals``): a CPU driver may then round to bfloat16 by an instruction that
    flushes them too (``kernels.x86.bfloat16_store``).
    """

    rule: str
    present: tuple = ()
    writes: tuple = None
    sums: tuple = ()
    grad: bool = True
    per_segment: tuple = ()
    formats: tuple = ()
    master: bool = False
    stochastic: bool = False
    flushes: bool = False


@functools.cache  # inspect.signature took 35 of the 200 µs of a small bf16 model's step
def buffer_names(rule):
    """The array arguments of ``rule``: everything before ``h``."""
    return tuple(inspect.signature(rule).parameters)[:-1]


def state_names(rule):
    """The state arguments of ``rule``: its arrays other than ``p`` and ``g``."""
    return tuple(name for name in buffer_names(rule) if name not in TENSORS)


def scalars_type(rule):
    """The named tuple type of ``rule``'s ``h``, which its annotation names."""
    return inspect.signature(rule).parameters["h"].annotation


def results(rule):
    """What ``rule`` returns, by name: see :func:`rules.returns`."""
    return getattr(rule, "returns", tuple(n for n in buffer_names(rule) if n != "g"))


def arrays(rule, present, master=False):
    """The arrays a driver of ``rule`` takes, in order: its ``p`` and ``g``, the master
    weights ``w`` with ``master``, then the states in ``present``."""
    taken = tuple(n for n in buffer_names(rule) if n in TENSORS or n in present)
    if not master:
        return taken
    tensors = sum(n in TENSORS for n in taken)
    return taken[:tensors] + ("w",) + taken[tensors:]


def float32s(values):
    """The numbers of ``h`` or ``prep``, in field order, as the float32 array that the CPU
    kernels take. This is where the host's numbers are rounded to float32, once, for
    every field at the same cost. Numba types an array argument in C, where a tuple
    costs a microsecond a call; and ``fromiter`` reads a named tuple twice as fast as
    ``np.array`` does (it runs a few times a step). CUDA kernels take
    ``tuple(float32s(values))``, which goes to the device by value."""
    return np.fromiter(values, FLOAT32)


@functools.cache
def _rules_source():
    return inspect.getsource(rules) + inspect.getsource(codecs)


def _not_infinite(n):
    """The statement that makes a block's absmax ``<n>_top`` NaN where it is infinite:
    then every value of the block decodes as NaN. (An infinite absmax encoded the
    infinity itself as inf * (1 / inf), a NaN, in the code of the map's most negative
    value, and decoded it as -inf, beside NaN elsewhere.)"""
    return f"{n}_top = {n}_top if {n}_top < INFINITY else NOT_A_NUMBER"


def _scales(n):
    """The statements that bind ``<n>_prescale`` and ``<n>_inverse``, by which the new
    values of a block with the absmax ``<n>_top`` are encoded (see
    ``codecs.LARGEST_PLAIN_ABSMAX`` and ``SMALLEST_PLAIN_ABSMAX``)."""
    return [f"{n}_prescale = PRESCALE if {n}_top > LARGEST_PLAIN_ABSMAX else ONE",
            f"{n}_prescale = SUBNORMAL_PRESCALE if ZERO < {n}_top < SMALLEST_PLAIN_ABSMAX "
            f"else {n}_prescale",
            f"{n}_inverse = ONE / ({n}_top * {n}_prescale) if {n}_top > ZERO else ZERO"]


def _scaled(n, fmt, value):
    """``value``, element i of ``n``'s new values (``<n>_new[i]``) times scales, as 8-bit
    ``fmt`` encodes it: never 0 for a positive ``<n>_new[i]`` in an unsigned map."""
    return f"scaled_positive({value}, {n}_new[i])" if fmt in codecs.UNSIGNED else value


def _encoded(n, fmt, at):
    """The statements that encode element i of ``n``'s new values (``<n>_new[i]``) of a block
    in 8-bit ``fmt`` into ``at``, by the block's ``<n>_prescale`` and ``<n>_inverse``."""
    return [f"{n}_scaled = {_scaled(n, fmt, f'{n}_new[i] * {n}_prescale * {n}_inverse')}",
            f"{at} = dynamic_code({n}_scaled, {fmt}_buckets[dynamic_bucket({n}_scaled)])"]


def _index_halves(first):
    """The statement that binds ``low_base`` and ``high_base``, the halves of the index
    ``first`` of a CPU loop's element 0, from which its body counts (see build's body)."""
    return f"low_base = np.uint32({first}); high_base = np.uint32(({first}) >> 32)"


def _block_chunk(taken, quantized, writes, bits, body, stochastic):
    """The arguments and body of the chunk function of a pass over blocks of 8-bit
    state (``codecs.QUANTIZED``): rows ``first_block`` to ``last_block`` of ``blocks``,
    each row ``(segment, offset, size, small)`` a block of ``size`` elements from
    ``offset`` of a segment: of the tensors at the addresses ``p[segment]``,
    ``g[segment]`` (and ``w[segment]``; 16-bit ones, in ``bits``, as their bits), and of
    the state from ``state_starts[segment]`` (as in a segment pass). A block with
    ``small >= 0`` belongs to a tensor too small to quantize, whose state is float32 at
    ``<name>_small[small:]``; the others are decoded into ``<name>_old``, stepped into
    ``<name>_new``, then their new absmax (``<name>_absmax[b]``) is found, and their
    codes written from it: one read and one write of their bytes, each loop over a
    block vectorised."""
    arguments = (f"({', '.join(taken)}, blocks, state_starts"
                 + "".join(f", {n}_absmax, {n}_small" for n in quantized)
                 + ", first_block, last_block, prepared, named"
                 + (", key, first" if stochastic else "") + "):\n")
    written = [n for n in quantized if n in writes]
    # Each block's slices, indexed from 0, which LLVM vectorises (see cpu.CHUNK); its
    # elements' random bits counted from its first one's (see build's body).
    small = body(lambda n: f"{n}_s[i]" if n in quantized else f"{n}_b[i]", None)
    stepped = body(lambda n: f"{n}_old[i]" if n in quantized else f"{n}_b[i]", None,
                   blocks=True)
    slices = [f"{a}_b = tensor_part{'_bits' if a in bits else ''}({a}[segment], offset, "
              f"size)" if a in ADDRESSED else f"{a}_b = {a}[state_base:state_base + size]"
              for a in taken]
    lines = ["begin_chunk()"] + [f"{n}_{kind} = np.empty(BLOCK, float32)"
             for n in quantized for kind in ("old", "new")] + [
        "entries = np.empty(BLOCK, np.int32)",  # encode_block's scratch
        "for b in range(first_block, last_block):",
        "    segment, offset, size, small = blocks[b, 0], blocks[b, 1], blocks[b, 2], "
        "blocks[b, 3]",
        "    state_base = state_starts[segment] + offset",
        *(["    " + _index_halves("first + state_base")] if stochastic else []),
        "    " + "; ".join(slices),
        "    if small >= 0:",
        "        " + "; ".join(f"{n}_s = {n}_small[small:small + size]" for n in quantized),
        "        for i in range(size):",
        f"            {small}",
        "        continue"]
    # Decoded in loops of their own: gathers (map[code]) in the loop that reads and
    # writes the tensors through their addresses keep LLVM from vectorising it (8-bit
    # Adam took 1.7x as long).
    def steps(whole):
        # A whole block's loops run BLOCK times, a constant, which LLVM vectorises
        # without remainder loops (with size alone, 8-bit Adam took 1.15x as long at 2e7
        # elements, Intel Xeon, AVX-512), and it is decoded and encoded by the driver's
        # decode_block (kernels.x86's permutes, where they compile) and encode_block.
        count = "BLOCK" if whole else "size"
        lines = []
        for n in quantized:
            lines += ([f"decode_block({n}_b, {quantized[n]}_map, {n}_absmax[b], {n}_old)"]
                      if whole else
                      [f"{n}_scale = {n}_absmax[b]", "for i in range(size):",
                       f"    {n}_old[i] = {quantized[n]}_map[{n}_b[i]] * {n}_scale"])
        lines += [f"for i in range({count}):", f"    {stepped}"]
        for n in written:
            # The largest magnitude as the largest of the bits without the sign, which
            # is a NaN where there is one (so every value of the block decodes as NaN),
            # and a reduction over integers, which vectorises (one over floats does not).
            # In int32: Numba widens uint32 to 64 bits, whose maximum AVX2 lacks (the two
            # reductions took 0.7 of 8-bit Adam's 3.6 ns per element on AMD Zen 3).
            lines += [f"{n}_bits = NO_BITS",
                      f"for i in range({count}):",
                      f"    {n}_bits = max({n}_bits, "
                      f"np.int32(np.float32({n}_new[i]).view(np.int32) & MAGNITUDE))",
                      f"{n}_top = np.int32({n}_bits).view(np.float32)", _not_infinite(n),
                      f"{n}_absmax[b] = {n}_top", *_scales(n)]
            lines += ([f"if {n}_prescale != ONE:",  # rare: the encoding's loops stay as they are
                       f"    for i in range(BLOCK): "
                       f"{n}_new[i] = {_scaled(n, quantized[n], f'{n}_new[i] * {n}_prescale')}",
                       f"encode_block({n}_new, {n}_inverse, {quantized[n]}_buckets, {n}_b, "
                       f"entries, {quantized[n] in codecs.UNSIGNED})"] if whole else
                      [f"for i in range({count}):",
                       *(f"    {line}" for line in _encoded(n, quantized[n], f"{n}_b[i]"))])
        return lines

    lines += ["    if size == BLOCK:", *(f"        {line}" for line in steps(True)),
              "    else:", *(f"        {line}" for line in steps(False))]
    return arguments + "".join(f"    {line}\n" for line in lines) + "    return ()\n"


def _block_steps(quantized, writes, body, segment_at):
    """The statements of a CUDA block that steps one block of 8-bit state (as
    :func:`_block_chunk` does on the CPU; row ``b`` of ``blocks``, bound to ``segment,
    offset, size, small``, ``base`` and ``state_base``): its threads stride through the
    elements, decoding, stepping and keeping the new values in shared memory, then
    find the new absmax together (``block_reduce``) and encode."""
    written = [n for n in quantized if n in writes]
    small = body(lambda n: f"{n}_small[small + i]" if n in quantized else segment_at(n),
                 "first + state_base + i")
    stepped = body(lambda n: f"{n}_old" if n in quantized else segment_at(n),
                   "first + state_base + i", blocks=True)

    def threads(*statements):
        return ["i = cuda.threadIdx.x", "while i < size:",
                *(f"    {line}" for line in statements), "    i += cuda.blockDim.x"]

    lines = ["if small >= 0:", *(f"    {line}" for line in threads(small)), "    return"]
    lines += [f"{n}_new = cuda.shared.array(BLOCK, float32)" for n in written]
    lines += [f"{n}_bits = NO_BITS" for n in written]
    lines += [f"{n}_scale = {n}_absmax[b]" for n in quantized]
    lines += threads(*[f"{n}_old = {quantized[n]}_map[{n}[state_base + i]] * {n}_scale"
                       for n in quantized], stepped,
                     *[f"{n}_bits = max({n}_bits, np.float32(new_{n}).view(np.uint32) "
                       "& MAGNITUDE)" for n in written])
    for n in written:
        lines += [f"{n}_top = np.uint32(block_reduce(shared_bits, {n}_bits, True))"
                  ".view(np.float32)", _not_infinite(n),
                  f"if cuda.threadIdx.x == 0: {n}_absmax[b] = {n}_top", *_scales(n),
                  *threads(*_encoded(n, quantized[n], f"{n}[state_base + i]"))]
    return "\n    ".join(lines)


def build(spec, loops, namespace, filename, fingerprint, compile_chunk=None):
    """Define the driver ``<rule>__<present...>__<hash>(*arrays, prep, h, ...)`` of the
    :class:`Pass` ``spec`` and return it.

    ``loops`` is the function body: its first line ends the argument list. Its
    placeholders are filled with one statement each:

    - ``{body}``, ``{segment_body}`` (CUDA's): the rule on element ``i`` of the arrays,
      or of the arrays at ``base + i`` (tensors) and ``state_base + i`` (states). The
      gradient is prepared with ``prepare(p, g, prepared)``; a rule without ``p``
      reads it as it is. ``{slices}`` binds the chunk slices ``<array>_c`` to
      ``[start:stop]`` of the arrays, ``{state_slices}`` those of the states alone.
    - ``{named}`` binds ``named``, the rule's scalars in their named type, from ``h``
      (see :func:`float32s`) and row ``c`` of ``row_scalars``, and ``prepared``, the
      values of ``prep`` (``prep`` itself for a rule that does not prepare ``g``), all
      as float32. A parallel loop needs it inside its body, where Numba's parfor
      lowering accepts it.
    - ``{first}``: the first array; ``{tensor_chunks}`` binds ``p_c``, ``g_c`` (and
      ``w_c``) to chunk ``c`` of the buffers at the addresses ``p``, ``g`` (and ``w``)
      (``segment_chunk``; ``segment_chunk_bits`` for 16-bit ones).
    - ``{begin_sums}`` zeroes the running sums ``total0 ...``; ``{store_sums}`` writes
      them to ``partials[c, j]``; ``{block_sums}`` adds them over a CUDA block first.
    - ``{chunk}`` runs the rule over the chunk arrays ``<array>_c`` (binding the sums
      ``total0 ...``), of at most ``LANES.size`` elements where the pass rounds
      stochastically, by calling ``<driver>_chunk``, a function of its own that
      ``compile_chunk`` compiles (``{chunk_in_segment}``: over chunk ``c`` of a
      segment), and which first calls the namespace's ``begin_chunk()`` (the CPU's
      request for vectors of its width: see ``cpu.WIDE_VECTORS``). Its
      scalars arrive as arguments, which the compiler keeps in registers through the
      loop. Written inline in a parallel loop's body, the loop reread them from
      memory that its stores may alias (Numba's parfor lowering hoists them out of
      the body), and the Adam kernel at 1e6 did not get faster with a second thread.

    - ``{random_arguments}`` names ``key`` and ``first`` (the seed's key, and the global
      index of element 0) where the pass rounds stochastically.
    - ``{block_arguments}`` names the absmax and small arrays of the 8-bit state
      buffers, and ``{block_chunk}`` runs the chunk function over blocks ``c *
      per_chunk`` on (see :func:`_block_chunk`), or ``{block_steps}`` (several
      lines, indented as a function body) steps block ``b`` with a CUDA block's threads
      (see :func:`_block_steps`): the loops of a pass that keeps state in 8 bits, which
      only these take.

    ``fingerprint`` is whatever else the compiled code depends on (compiler options,
    constants).
    """
    rule = getattr(rules, spec.rule)
    names = buffer_names(rule)
    unknown = set(spec.present) - set(state_names(rule))
    if unknown:
        raise ValueError(f"rule {spec.rule} has no state {sorted(unknown)}")
    taken = arrays(rule, spec.present, spec.master)
    formats = dict(spec.formats)
    # Buffers kept in 8 bits, block by block (codecs.QUANTIZED): state only.
    quantized = {n: f for n, f in formats.items() if f in codecs.QUANTIZED}
    formats = {n: f for n, f in formats.items() if n not in quantized}
    if set(quantized) & {*TENSORS, "w"} or set(quantized) - set(taken) or (
            quantized and (("{block_chunk}" not in loops and "{block_steps}" not in loops)
                           or spec.sums or spec.per_segment)):
        raise ValueError(f"pass {spec} quantizes what is not state it takes, or is not a "
                         "flat pass over blocks")
    master_format = formats.pop("w", None)
    remainder = master_format == REMAINDER
    bits = {*formats, *(("w",) if remainder else ())}  # kept as 16 bits each
    if set(formats) - set(taken) or set(formats.values()) - set(codecs.CODECS) or (
            spec.master and formats.get("p") is None) or (
            master_format not in (None, REMAINDER)) or (
            remainder and (formats.get("p") != "bfloat16" or not spec.master)):
        raise ValueError(f"pass {spec} stores buffers it does not take, in formats it "
                         "does not know, or master weights for a float32 p (a remainder "
                         "for a bfloat16 one only)")
    writes = spec.writes if spec.writes is not None else tuple(
        n for n in results(rule) if n in taken)
    sums = tuple(spec.sums)
    if set(writes) - set(taken) or set(sums) - set(results(rule)) or len(sums) > MAX_SUMS:
        raise ValueError(f"pass {spec} writes or sums what rule {spec.rule} does not have")

    # The buffers written through a codec (or to the master weights and then p) take
    # the rule's result as new_<name> first; those rounded stochastically draw bits.
    encoded = [n for n in writes if n in formats]
    drawn = [n for n in encoded if spec.stochastic and not (n == "p" and spec.master)]

    def body(at, index, blocks=False):
        # index: the expression of element i's index, whose halves random_bits takes; or
        # None in a CPU loop of at most LANES elements, which counts them from element
        # 0's (low_base and high_base) in 32-bit lanes: LANES[i], a load, which LLVM does
        # not widen to 64 bits as it does the loop's counter, and a carry into the high
        # half. From an int64 index, the hash took 0.63 ns an element against 0.26 (AMD
        # Zen 3, AVX2), where it is most of stochastic rounding's cost. Each call
        # computes them anew: halves bound once for several buffers' calls were widened
        # again (three bfloat16 buffers took 1.6x as long).
        # blocks: in a block of 8-bit state, whose values (decoded) are read at at(n) and
        # whose new values go to <name>_new[i].
        def value(n):
            if n == "p" and remainder:
                return f"bfloat16_rebuild({at('p')}, {at('w')})"
            if n == "p" and spec.master:  # the master, unless p was written since
                # Compared by the portable rounding where the stores take AVX-512 BF16's
                # (codecs.compiled): with that in the comparison too, LLVM left Adam's
                # loop with bfloat16 state scalar (1.9 ns an element against 0.94).
                return (f"({at('w')} if {formats['p']}_rounded({at('w')}) == {at('p')} "
                        f"else {formats['p']}_load({at('p')}))")
            return f"{formats[n]}_load({at(n)})" if n in formats else at(n)

        def load(n):
            if n == "g" and not spec.grad:
                return "ZERO"
            if n == "g" and "p" in names:
                return f"prepare({value('p')}, {value('g')}, prepared)"
            return value(n) if n in taken else "ZERO"

        def store(n):
            if n in sums:
                return f"term{sums.index(n)}"
            if n not in writes:
                return "_"
            return f"new_{n}" if n in encoded or (blocks and n in quantized) else at(n)

        line = (f"{', '.join(map(store, results(rule)))} = "
                f"rule({', '.join(map(load, names))}, named)")
        def encode(n):
            # A buffer's random stream is its place among the driver's arrays: a change of
            # that order changes the bits of every stochastic run (and its resumption).
            if n in drawn:
                return (f"{formats[n]}_store_stochastic(new_{n}, "
                        f"random_bits(key, {halves}, {taken.index(n)}))")
            if n == "p" and remainder:
                return "bfloat16_upper(new_p)"
            return f"{formats[n]}_store(new_{n})"

        low = "np.uint32(low_base + LANES[i])"
        halves = (f"{low}, np.uint32(high_base + ({low} < low_base))" if index is None
                  else f"np.uint32({index}), np.uint32(({index}) >> 32)")
        stores = [f"{at('w')} = {'bfloat16_remainder(new_p)' if remainder else 'new_p'}"
                  for n in encoded if n == "p" and spec.master]
        stores += [f"{at(n)} = {encode(n)}" for n in encoded]
        if blocks:
            stores += [f"{n}_new[i] = new_{n}" for n in quantized if n in writes]
        return "; ".join([line] + stores + [f"total{j} = add_to_sum(total{j}, term{j})"
                                             for j in range(len(sums))])

    def segment_at(n):
        return f"{n}[base + i]" if n in ADDRESSED else f"{n}[state_base + i]"

    Scalars = namespace["Scalars"] = scalars_type(rule)
    namespace["float32"] = float32
    unknown = set(spec.per_segment) - set(Scalars._fields)
    if unknown or len(spec.per_segment) > MAX_PER_SEGMENT:
        raise ValueError(f"rule {spec.rule}'s scalars have no fields {sorted(unknown)}")
    # Only the pass that takes caution_scale per segment applies a cautious mask (see
    # fastopt.optim.engine.cautious_step); elsewhere caution is the constant False, which
    # drops the mask's four vector operations from the loop (read at run time, they cost
    # Adam about 10% at 1e5 elements).
    cautious = "caution_scale" in spec.per_segment
    # float32() is a no-op on the backends' float32s, and keeps a caller who passes
    # Python floats from compiling the rule in float64.
    fields = [f"row_scalars[c, {spec.per_segment.index(f)}]" if f in spec.per_segment
              else "False" if f == "caution" and not cautious
              else f"float32(h[{i}])" for i, f in enumerate(Scalars._fields)]
    totals = [f"total{j}" for j in range(len(sums))]
    begin_sums = "; ".join(f"{t} = 0.0" for t in totals) or "pass"
    sums_tuple = "".join(t + ", " for t in totals)  # "total0, total1, ", or nothing
    chunk_arrays = [f"{a}_c" for a in taken]
    random = ", key, base" if spec.stochastic else ""  # see codecs.random_bits
    # A stochastic pass's chunk counts its elements' random bits in LANES (see body).
    counted = (f"    if {taken[0]}_c.size > LANES.size:\n"
               "        raise ValueError('a chunk longer than LANES')\n"
               f"    {_index_halves('base')}\n") if spec.stochastic else ""
    chunk_text = (f"({', '.join(chunk_arrays)}, prepared, named{random}):\n"
                  "    begin_chunk()\n"
                  f"{counted}"
                  f"    {begin_sums}\n"
                  f"    for i in range({taken[0]}_c.size):\n"
                  f"        {body(lambda n: f'{n}_c[i]', None)}\n"
                  f"    return ({sums_tuple})\n")

    def chunk_call(draw):  # draw: the index of the chunk's first element's random bits
        return (f"{sums_tuple}{'= ' if totals else ''}"
                f"CHUNK_FUNCTION({', '.join(chunk_arrays)}, prepared, named"
                f"{', key, ' + draw if spec.stochastic else ''})")

    if quantized:
        chunk_text = _block_chunk(taken, quantized, writes, bits, body, spec.stochastic)
    block_arguments = "".join(f", {n}_absmax, {n}_small" for n in quantized)
    text = loops.format(
        random_arguments=", key, first" if spec.stochastic else "",
        block_arguments=block_arguments,
        block_chunk=f"CHUNK_FUNCTION({', '.join(taken)}, blocks, state_starts"
                    f"{block_arguments}, "
                    f"c * per_chunk, min(c * per_chunk + per_chunk, blocks.shape[0]), "
                    f"prepared, named"
                    f"{', key, first' if spec.stochastic else ''})",
        block_steps=_block_steps(quantized, writes, body, segment_at) if quantized else "",
        body=body(lambda n: f"{n}[i]", "first + i"),
        segment_body=body(segment_at, "first + chunks[c, 3] + i"),
        slices="; ".join(f"{a}_c = {a}[start:stop]" for a in taken),
        state_slices="; ".join(f"{a}_c = {a}[start:stop]" for a in taken
                               if a not in ADDRESSED) or "pass",
        named=f"named = Scalars({', '.join(fields)}); prepared = " + (
            "(float32(prep[0]), float32(prep[1]), float32(prep[2]), float32(prep[3]))"
            if "p" in names and spec.grad else "prep"),
        chunk=chunk_call("first + start"),
        chunk_in_segment=chunk_call("first + chunks[c, 3]"),
        first=taken[0],
        tensor_chunks="; ".join(
            f"{a}_c = segment_chunk{'_bits' if a in bits else ''}({a}, chunks, c)"
            for a in taken if a in ADDRESSED) or "pass",
        begin_sums=begin_sums,
        store_sums="; ".join(f"partials[c, {j}] = {t}" for j, t in enumerate(totals))
        or "pass",
        block_sums="; ".join(f"{t} = block_reduce(shared, {t}, False)" for t in totals)
        or "pass")
    digest = hashlib.sha1((_rules_source() + chunk_text + text + fingerprint).encode())
    name = "__".join((spec.rule,) + tuple(spec.present) + (digest.hexdigest()[:10],))
    if "CHUNK_FUNCTION" in text:
        exec(compile(f"def {name}_chunk{chunk_text}", filename, "exec"), namespace)
        namespace[f"{name}_chunk"] = compile_chunk(namespace[f"{name}_chunk"])
    source = f"def {name}({', '.join(taken + ('prep', 'h'))}{text}"
    exec(compile(source.replace("CHUNK_FUNCTION", f"{name}_chunk"), filename, "exec"),
         namespace)
    return namespace[name]
