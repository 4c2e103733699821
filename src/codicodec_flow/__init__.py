"""codicodec-flow: streaming music continuation in CoDiCodec's latent space.

The public API, for scripts and notebooks (the command line is `codicodec-flow`, see commands/):

    from codicodec_flow import load_bundle, StreamGenerator, SampleConfig
    bundle = load_bundle("runs/album/ema.pt")
    gen = StreamGenerator(bundle.model, bundle.stats, SampleConfig(solver="heun", nfe=8), "cpu")
    latents = gen.generate(30)  # (1, 30, 8, 64) codec latents, ~20 s
"""

__version__ = "0.1.0"

from .cache import KVCache
from .checkpoint import Bundle, load_bundle
from .codec import CHUNK_SAMPLES, CHUNK_SECONDS, SAMPLE_RATE, Codec, load_codec
from .codec.audio import read_audio, write_wav
from .codec.prompt import decode_latents, encode_prompt
from .commands.sample import run_sample
from .config import (LIVE_SAMPLING, MODEL_PRESETS, FlowConfig, ModelConfig, PreprocessConfig, SampleConfig,
                     TrainConfig)
from .data.dataset import load_latents
from .data.preprocess import run_preprocess
from .errors import FlowError
from .evaluation.evaluate import EvalConfig, run_eval
from .generate import StreamGenerator
from .latents import LatentStats
from .model import FlowDiT
from .solvers import steps_for
from .plan import plan_run
from .train import run_train
from .util.logs import show_logs

__all__ = ["Bundle", "CHUNK_SAMPLES", "CHUNK_SECONDS", "Codec", "EvalConfig", "FlowConfig", "FlowDiT", "FlowError",
           "KVCache", "LIVE_SAMPLING", "LatentStats", "MODEL_PRESETS", "ModelConfig", "PreprocessConfig", "SAMPLE_RATE",
           "SampleConfig", "StreamGenerator", "TrainConfig", "decode_latents", "encode_prompt", "load_bundle",
           "load_codec", "load_latents", "plan_run", "read_audio", "run_eval", "run_preprocess", "run_sample",
           "run_train", "show_logs", "steps_for", "write_wav"]
