"""GPU kernels for the deployment path (installed as ``trt_prune.kernels``; the source lives in ``kernels/``).

Each kernel is a Triton program with a plain torch reference beside it in the same module. The reference is the
definition (tests compare the kernel with it) and the fallback where no GPU is present. Triton ships with torch;
``TRITON_INTERPRET=1`` (set before a kernel first runs: each is created on first use) runs the kernels on the CPU
for the tests.
"""
