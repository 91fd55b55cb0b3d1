"""usp_megatron: Unified Sequence Parallelism (Ulysses x Ring attention) for Megatron-core."""
