"""The fast paths of the method's one op (core/backends.py), each a registered Backend, and the one switch
that turns them off (switches.py, SIGMATUNE_DISABLE_KERNELS): the fused Triton transform (transform_kernel,
its torch.library op in library, launched by launch), the band kernels (band_kernel). backends.py registers
them. The serving kernels are serving/ops/'s.
"""

from . import backends  # noqa: F401  importing the package registers the fast paths with core's op
