import os

# Triton reads TRITON_INTERPRET when it is first imported, and torch.fx (via the IR) may import it before any
# kernel test runs: set it for the whole session so the Triton kernels run in the CPU interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")
