"""Everything that wraps the model for memory or distribution: activation checkpointing,
FSDP2, tensor parallelism. The model itself never imports from here."""
