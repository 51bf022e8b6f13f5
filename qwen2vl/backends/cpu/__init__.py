"""The CPU backend: C kernels per CPU tier (see isa.py for the tiers and the QWEN2VL_CPU_ISA cap,
native.py for how they are built and loaded, csrc/ for the sources)."""
