"""GDN and attention kernels: torch reference (CPU/GPU) and Triton (GPU, imported lazily)."""
