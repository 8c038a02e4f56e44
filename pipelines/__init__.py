"""Everything between a shard on disk and a batch on the device.

Import the submodules (`pipelines.shards`, ...) directly: this package imports nothing heavy,
so offline tools can use the shard format without loading DALI or torch.
"""
