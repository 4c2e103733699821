"""codicodec-flow: streaming music continuation in CoDiCodec's latent space."""

__version__ = "0.1.0"
