"""The data pipeline: audio folder -> latent shards (preprocess, shards) -> training crops (dataset); example music (synth)."""
