"""Switching denormal numbers off for a kernel: the FTZ and DAZ bits of x86's MXCSR.

``denormals_off(flag)`` returns the thread's current mode and, if ``flag``, makes results
that would be subnormal zero (FTZ) and reads subnormal inputs as zero (DAZ);
``restore(saved)`` puts the saved mode back. Both are jitted helpers to call at the start
and end of a kernel (on each thread, in a parallel loop). On other machines they do
nothing.
"""

import platform

from numba import njit, types
from numba.core import cgutils
from numba.core.extending import intrinsic

FTZ_DAZ = 0x8040  # MXCSR bit 15 flushes results to zero, bit 6 reads inputs as zero

if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86"):
    from llvmlite import ir

    def _mxcsr_call(builder, name, slot):
        bytes_pointer = ir.IntType(8).as_pointer()
        function = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [bytes_pointer]), name)
        builder.call(function, [builder.bitcast(slot, bytes_pointer)])

    @intrinsic
    def _read(typingctx):
        def codegen(context, builder, signature, args):
            slot = cgutils.alloca_once(builder, ir.IntType(32))
            _mxcsr_call(builder, "llvm.x86.sse.stmxcsr", slot)
            return builder.load(slot)
        return types.uint32(), codegen

    @intrinsic
    def _write(typingctx, value):
        def codegen(context, builder, signature, args):
            _mxcsr_call(builder, "llvm.x86.sse.ldmxcsr", cgutils.alloca_once_value(builder, args[0]))
            return context.get_dummy_value()
        return types.void(types.uint32), codegen

    @njit(inline="always")
    def denormals_off(flag):
        saved = _read()
        if flag:
            _write(saved | types.uint32(FTZ_DAZ))
        return saved

    @njit(inline="always")
    def restore(saved):
        _write(saved)

else:
    @njit(inline="always")
    def denormals_off(flag):
        return types.uint32(0)

    @njit(inline="always")
    def restore(saved):
        pass
