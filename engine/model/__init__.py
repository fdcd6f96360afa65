"""The hybrid decoder: Gated DeltaNet + gated attention layers, dense SwiGLU MLP or sparse MoE."""
