"""Custom kernels (blocksparse attention, MoE) written once for Metal, CUDA and C++ threads."""
