"""HuggingFace InternVL checkpoints <-> megatron torch_dist checkpoints (``v2pe-convert``).

- ``mappings``: the typed tensor mappings and the table (:func:`weight_map`);
- ``hf_config``: ``config.json`` <-> ``ModelConfig`` (both layouts, V2PE keys);
- ``safetensors_io``: lazy sharded reading, sharded writing with an index;
- ``load``: ``hf.load`` (an HF folder as our model, in memory);
- ``megatron``: import to / export from torch_dist checkpoints, one tensor at a time;
- ``verify``: both sides' forward on random multimodal inputs.

See docs/convert.md.
"""
