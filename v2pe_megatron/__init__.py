"""v2pe-megatron: InternVL2-style VLM pretraining on megatron-core with V2PE positions."""

__version__ = "0.1.0"
