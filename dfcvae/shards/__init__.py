"""The shard format and everything that reads or writes it, one job per module.

    format.py   member names, encoding and decoding, the manifest: read, write, hash
    writer.py   samples -> one tar shard, byte-identical on reruns
    tar.py      the tar walker: member names and byte ranges, every header checked
    plan.py     the epoch plan: which samples each rank and stream reads, in which order
    slots.py    shared-memory slots that loader processes fill with batches in place
    loader.py   one rank's batches of an epoch: the plan read through the walker into the slots

Modules import only dfcvae.config, dfcvae.internals (slots.py) and each other, in the order
above. Import the module you need (`from dfcvae.shards.loader import make_loader`): this file
imports nothing, so a stage that writes shards does not load the loader.
"""
