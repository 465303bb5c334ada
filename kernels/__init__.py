"""Triton kernels for the DDFM step tail, installed as ``ddfm_fast.kernels``.

Nothing here is imported unless the Triton backend is asked for, so the package works where Triton is absent.
"""
