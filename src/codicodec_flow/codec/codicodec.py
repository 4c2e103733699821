"""The real codec: the PyPI package `codicodec` (0.1.2) behind the Codec protocol.

Weights come from, in order: the `ckpt` argument (CLI `--codec-ckpt`), the environment variable
CODICODEC_CKPT, the package's own file `codicodec/models/codicodec.pt`, and last the package's
first-use download from Hugging Face (SonyCSLParis/codicodec).

Trust: the package loads checkpoints with full unpickling (`torch.load(weights_only=False)`), which
runs any code a file carries. We load with `weights_only=True`; full unpickling is allowed only for
the official file at the package's default path (only the package's own downloader writes it) or
when the caller passes `trust_pickle=True` (CLI `--trust-codec-ckpt`).

Process-wide state: the package switches fp16 autocast with the module global
`codicodec.utils.mixed_precision`, even on CPU where it is ~4x slower. Each call here sets it to
"CUDA only" and restores it afterwards, so two codecs on different devices must not run in
parallel threads. Importing the package also flips cuDNN/TF32 flags and TORCHINDUCTOR_CACHE_DIR;
we put those back so the rest of the process keeps its own numerics.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import os
import pickle
import sys
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import CodecError
from ..util.fsutil import load_error_reason
from .base import CHANNELS, CHUNK_SAMPLES, LATENT_DIM, TOKENS_PER_CHUNK


def _import_package():
    """Import codicodec, undoing the global flags its import sets."""
    flags = [(torch.backends.cudnn, "benchmark"), (torch.backends.cudnn, "allow_tf32"),
             (torch.backends.cuda.matmul, "allow_tf32"),
             (torch.backends.cuda.matmul, "allow_fp16_reduced_precision_reduction")]
    saved = [getattr(obj, attr) for obj, attr in flags]
    inductor_dir = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    try:
        import codicodec.hparams as hparams
        import codicodec.hparams_inference as hparams_inference
        import codicodec.inference as inference
        import codicodec.models as models
        import codicodec.utils as utils
    finally:
        for (obj, attr), value in zip(flags, saved):
            setattr(obj, attr, value)
        if inductor_dir is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = inductor_dir
    return hparams, hparams_inference, inference, models, utils


try:
    cc_hparams, cc_hparams_inference, cc_inference, cc_models, cc_utils = _import_package()
    _IMPORT_ERROR = None
except ImportError as e:  # reported at construction, as a CodecError
    _IMPORT_ERROR = e

HOW_TO = ("Download codicodec.pt from the Hugging Face repo SonyCSLParis/codicodec on a connected "
          "machine, then pass --codec-ckpt PATH or set CODICODEC_CKPT=PATH; "
          "or use --codec spectral offline.")


class CoDiCodec:
    """CoDiCodec: (2, N) 48 kHz stereo <-> (T, 8, 64) latents, with its streaming decoder."""

    name = "codicodec"

    def __init__(self, device: torch.device | str = "cpu", ckpt: str | Path | None = None,
                 trust_pickle: bool = False):
        if _IMPORT_ERROR is not None:
            raise CodecError(f"the codicodec package is not importable ({_IMPORT_ERROR}): "
                             "pip install codicodec==0.1.2, or use --codec spectral")
        self.version = importlib.metadata.version("codicodec")
        self.device = torch.device(device)
        self.denoising_steps: int | None = None  # None: the package's defaults (5 parallel, 2 streaming)
        self.max_chunks_per_pass = 64  # ~44 s of audio per encoder pass bounds memory on long files
        # The last STFT frame of a chunk (2048 window, 1024 hop, no centring) reads the first
        # 1024 samples of the next chunk, so a piece carries that much of the next one with it.
        self.lookahead_samples = cc_hparams.hop * cc_hparams.fac - cc_hparams.hop
        self.ckpt_path, official = _resolve_ckpt(ckpt)
        state = _load_state_dict(self.ckpt_path, trust_pickle or official)
        gen = cc_models.UNet()
        try:
            gen.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise CodecError(f"{self.ckpt_path} does not hold codicodec {self.version} weights "
                             f"({str(e).splitlines()[0]}). {HOW_TO}") from None
        del state
        # EncoderDecoder.__init__ always tries a Hugging Face download, so we set up its state by hand.
        ed = cc_inference.EncoderDecoder.__new__(cc_inference.EncoderDecoder)
        ed.device = self.device
        ed.load_path_inference = str(self.ckpt_path)
        ed.gen = gen.to(self.device).eval().requires_grad_(False)
        ed.latents_per_timestep = cc_hparams.num_latents  # 128 latents of 4 channels per chunk
        ed.bottleneck_channels = cc_hparams.bottleneck_channels
        ed.past_spec = ed.past_latents = None
        self._ed = ed

    @torch.no_grad()
    def encode(self, wave: torch.Tensor) -> torch.Tensor:
        """(2, N) waveform -> (ceil(N / 32768), 8, 64) latents; the last chunk is zero-padded."""
        if wave.ndim != 2 or wave.shape[0] != CHANNELS:
            raise ValueError(f"expected a (2, N) stereo waveform, got {tuple(wave.shape)}")
        wave = wave.to(self.device, torch.float32)
        n_chunks = -(-wave.shape[1] // CHUNK_SAMPLES)
        lookahead = self.lookahead_samples
        pieces = [torch.zeros(0, TOKENS_PER_CHUNK, LATENT_DIM)]  # so that N = 0 gives (0, 8, 64)
        for first in range(0, n_chunks, self.max_chunks_per_pass):
            last = min(first + self.max_chunks_per_pass, n_chunks)
            end = last * CHUNK_SAMPLES + (lookahead if last < n_chunks else 0)
            piece = wave[:, first * CHUNK_SAMPLES:end]
            piece = F.pad(piece, (0, end - first * CHUNK_SAMPLES - piece.shape[1]))
            with self._autocast_policy():
                # the package's own layout is already ours: (chunks, 128, 4) -> (chunks, 8, 64)
                z = self._ed.encode(piece, max_batch_size=self.max_chunks_per_pass,
                                    desired_channels=LATENT_DIM, fix_batch_size=False)
            pieces.append(z.float().cpu())  # (last - first, 8, 64)
        return torch.cat(pieces)  # (T, 8, 64)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(T, 8, 64) latents -> (2, T * 32768) waveform, decoded by the package's parallel mode."""
        _check_latents(latents, 3)
        n_chunks = latents.shape[0]
        if n_chunks == 0:
            return torch.zeros(CHANNELS, 0)
        with self._autocast_policy():
            wave = self._ed.decode(latents.to(self.device, torch.float32), mode="parallel",
                                   denoising_steps=self.denoising_steps)  # (2, T * 32768 + 1024)
        # the extra 1024 samples are the tail of the last frame's window
        return wave[:, :n_chunks * CHUNK_SAMPLES].float().cpu()

    def reset(self) -> None:
        """Forget the streaming decoder's past; the next decode_next starts a new stream."""
        self._ed.reset()

    @torch.no_grad()
    def decode_next(self, chunk: torch.Tensor) -> torch.Tensor:
        """(8, 64) latents of the next chunk -> (2, 32768) waveform continuing the stream."""
        _check_latents(chunk, 2)
        with self._autocast_policy():
            wave = self._ed.decode_next(chunk.to(self.device, torch.float32),
                                        denoising_steps=self.denoising_steps)  # (2, 32768)
        return wave.float().cpu()

    @contextlib.contextmanager
    def _autocast_policy(self):
        """Let the package autocast to fp16 on CUDA only (the flag is process-wide)."""
        previous = cc_utils.mixed_precision  # the global `distribute` reads
        cc_utils.mixed_precision = self.device.type == "cuda"
        try:
            yield
        finally:
            cc_utils.mixed_precision = previous


def _check_latents(latents: torch.Tensor, ndim: int) -> None:
    """Raise unless latents end in (8, 64) and have `ndim` dimensions."""
    if latents.ndim != ndim or tuple(latents.shape[-2:]) != (TOKENS_PER_CHUNK, LATENT_DIM):
        want = "(T, 8, 64)" if ndim == 3 else "(8, 64)"
        raise ValueError(f"expected latents shaped {want}, got {tuple(latents.shape)}")


def _resolve_ckpt(ckpt: str | Path | None) -> tuple[Path, bool]:
    """Find the weights file; also say whether it is the official one at the package's path."""
    official = Path(cc_hparams_inference.load_path_inference_default)
    if ckpt is not None:
        path, source = Path(ckpt).expanduser(), "--codec-ckpt"
    elif os.environ.get("CODICODEC_CKPT"):
        path, source = Path(os.environ["CODICODEC_CKPT"]).expanduser(), "CODICODEC_CKPT"
    else:
        if not official.is_file():
            try:
                with contextlib.redirect_stdout(sys.stderr):  # it prints progress; our stdout may carry JSON
                    cc_utils.download_model()  # the package's first-use download, into `official`
            except Exception as e:  # offline, hub errors, no huggingface_hub: all end the same way
                reason = (str(e).splitlines() or [type(e).__name__])[0]
                raise CodecError(f"CoDiCodec weights are not installed and the download failed "
                                 f"({reason}). {HOW_TO}") from None
        if not official.is_file():
            raise CodecError(f"CoDiCodec weights are missing from {official}. {HOW_TO}")
        return official, True
    if not path.is_file():
        raise CodecError(f"CoDiCodec weights not found at {path} (from {source}). {HOW_TO}")
    return path, path.resolve() == official.resolve()


def _load_state_dict(path: Path, trusted: bool) -> dict:
    """The UNet state dict stored under 'gen_state_dict' in the checkpoint at `path`."""
    mmap = zipfile.is_zipfile(path)  # mmap spares a second in-memory copy of ~600 MB
    try:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError:
            if not trusted:
                raise CodecError(
                    f"{path} is not a plain tensor file: it is corrupt, or it holds Python objects "
                    "that only full unpickling can load, and unpickling can run code from the file. "
                    "If you trust it, pass --trust-codec-ckpt (trust_pickle=True); otherwise "
                    f"re-download it. {HOW_TO}") from None
            ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except CodecError:
        raise
    except Exception as e:  # truncated zip, unreadable file, failing unpickle of a trusted file
        raise CodecError(f"could not read CoDiCodec weights from {path} ({load_error_reason(e)}). {HOW_TO}") from None
    if not isinstance(ckpt, dict) or "gen_state_dict" not in ckpt:
        raise CodecError(f"{path} is not a CoDiCodec checkpoint: it has no 'gen_state_dict'. {HOW_TO}")
    return ckpt["gen_state_dict"]


def installed_weights() -> Path | None:
    """The weights file this machine already has ($CODICODEC_CKPT or the package's own), without downloading."""
    if _IMPORT_ERROR is not None:
        return None
    env = os.environ.get("CODICODEC_CKPT")
    candidates = [Path(env).expanduser()] if env else []
    candidates.append(Path(cc_hparams_inference.load_path_inference_default))
    return next((p for p in candidates if p.is_file()), None)
