"""The CPU wing: what makes a CPU fast, kept beside the core.

Native kernels (`kernels`, built from csrc/ with the system's C++ compiler on first use),
linear layers with CPU-friendly weight gradients (`linear`), the gather and blocked MoE
dispatches (`moe`), native attention (`attention`) and the weight copies decoding reads
(`decode`). Each registers its implementations in `dsjax.impl` under the names a config
resolved for a CPU selects ('cpu', 'gather', 'blocked'); no core module imports this
package, and where the kernels cannot be built the wing's JAX forms run.
"""

from dsjax.cpu import attention, decode, linear, moe

__all__ = ["attention", "decode", "linear", "moe"]
