"""rerule.kernels: Triton kernels and their pure-torch references.

Depends on torch (and triton, imported lazily) only, never on the rest of rerule.
Importing this package never queries a GPU and never imports triton.
"""
