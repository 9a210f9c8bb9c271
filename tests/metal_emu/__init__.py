"""Metal emulation harness: runs the exact bodies given to `mx.fast.metal_kernel` on the CPU (test tooling).

See harness.py for what a call does, msl_shim.h for the MSL subset, runtime.h for the fiber scheduler.
"""

from .harness import EmulatedKernel, EmulatorError, cuda_kernel, metal_kernel

__all__ = ["EmulatedKernel", "EmulatorError", "cuda_kernel", "metal_kernel"]
