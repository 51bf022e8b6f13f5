"""The CPU backend (backend.py): C kernels per CPU tier (isa.py: the tiers and the QWEN2VL_CPU_ISA
cap; native.py: how csrc/ is built and loaded), FastLinear (linear.py), the compute-dtype policy."""
