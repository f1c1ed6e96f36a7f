"""One file per op: Triton kernels, launch wrappers, autograd.Function and the torch reference.

The public functions are re-exported by ``allo_kernels``; this package keeps the module names free
(``allo_kernels.ops.token_logprobs`` is the module, ``allo_kernels.token_logprobs`` the function).
"""
