"""Triton kernels of fastae and their launchers (installed as fastae.kernels).

Triton only: no autograd and no nn here. The autograd.Function that wraps these launchers lives
in fastae.functional.triton_encode. Set TRITON_INTERPRET=1 before importing this package to run
the kernels on the CPU with Triton's interpreter (how the tests run them without a GPU).
"""
