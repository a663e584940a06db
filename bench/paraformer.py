"""A Paraformer built offline with random weights, saved as a FunASR model directory ``AutoModel`` loads.

No model hub is reachable where the benchmarks run, and a non-autoregressive model's cost does not depend on
its weights (one encoder pass, one CIF predictor pass, one decoder pass, whatever the text), so a randomly
initialised model of the real size measures what the real one costs. ``LARGE`` is paraformer-zh's layout
(about 220 M parameters: a 50-block SANM encoder and a 16-block decoder of width 512, 8404 tokens); ``TINY``
the two-layer one the tests use. Built from FunASR's own registered classes, so nothing here is a copy of it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

N_MELS, LFR_M = 80, 7


@dataclass(frozen=True)
class Size:
    name: str
    width: int
    heads: int
    units: int
    encoder_blocks: int
    decoder_blocks: int
    tokens: int


LARGE = Size("large", width=512, heads=4, units=2048, encoder_blocks=50, decoder_blocks=16, tokens=8404)
TINY = Size("tiny", width=16, heads=2, units=32, encoder_blocks=2, decoder_blocks=2, tokens=32)
SIZES = {size.name: size for size in (LARGE, TINY)}


def config(size: Size) -> dict[str, Any]:
    """``config.yaml`` of a Paraformer of ``size`` (paraformer-zh's classes and options)."""
    attention = {
        "attention_heads": size.heads,
        "linear_units": size.units,
        "dropout_rate": 0.0,
        "positional_dropout_rate": 0.0,
    }
    return {
        "model": "Paraformer",
        "model_conf": {"ctc_weight": 0.0, "predictor_weight": 1.0, "predictor_bias": 1, "sampling_ratio": 0.75},
        "encoder": "SANMEncoder",
        "encoder_conf": {
            **attention,
            "num_blocks": size.encoder_blocks,
            "output_size": size.width,
            "attention_dropout_rate": 0.0,
            "input_layer": "pe",
            "pos_enc_class": "SinusoidalPositionEncoder",
            "normalize_before": True,
            "kernel_size": 11,
            "sanm_shfit": 0,
            "selfattention_layer_type": "sanm",
        },
        "decoder": "ParaformerSANMDecoder",
        "decoder_conf": {
            **attention,
            "num_blocks": size.decoder_blocks,
            "self_attention_dropout_rate": 0.0,
            "src_attention_dropout_rate": 0.0,
            "att_layer_num": size.decoder_blocks,
            "kernel_size": 11,
            "sanm_shfit": 0,
        },
        "predictor": "CifPredictorV2",
        "predictor_conf": {"idim": size.width, "threshold": 1.0, "l_order": 1, "r_order": 1, "tail_threshold": 0.45},
        "frontend": "WavFrontend",
        "frontend_conf": {
            "fs": 16000,
            "window": "hamming",
            "n_mels": N_MELS,
            "frame_length": 25,
            "frame_shift": 10,
            "lfr_m": LFR_M,
            "lfr_n": 6,
            "dither": 0.0,
        },
        "tokenizer": "CharTokenizer",
        "tokenizer_conf": {"unk_symbol": "<unk>"},
    }


def identity_mvn(dim: int) -> str:
    """An ``am.mvn`` in Kaldi nnet text form that shifts by 0 and scales by 1."""
    zeros, ones = " ".join(["0"] * dim), " ".join(["1"] * dim)
    return (
        f"<Nnet>\n<Splice> {dim} {dim}\n[ 0 ]\n<AddShift> {dim} {dim}\n<LearnRateCoef> 0 [ {zeros} ]\n"
        f"<Rescale> {dim} {dim}\n<LearnRateCoef> 0 [ {ones} ]\n</Nnet>\n"
    )


def build(out: Path, size: Size = LARGE, seed: int = 0) -> Path:
    """Save a randomly initialised Paraformer of ``size`` under ``out`` (created); returns ``out``."""
    import torch
    from funasr.register import tables

    layout = config(size)
    tokens = ["<blank>", "<s>", "</s>", *(f"t{i}" for i in range(size.tokens - 4)), "<unk>"]
    torch.manual_seed(seed)
    model_class = tables.model_classes[layout["model"]]
    args = {
        k: v
        for k, v in layout.items()
        if k not in ("model", "model_conf", "frontend", "frontend_conf", "tokenizer", "tokenizer_conf")
    }
    model = model_class(**args, **layout["model_conf"], input_size=N_MELS * LFR_M, vocab_size=len(tokens))
    out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out / "model.pt")
    (out / "config.yaml").write_text(yaml.safe_dump(layout))
    (out / "tokens.json").write_text(json.dumps(tokens))
    (out / "am.mvn").write_text(identity_mvn(N_MELS * LFR_M))
    return out


def parameters(out: Path) -> int:
    """How many weights the saved model has."""
    import torch

    return sum(t.numel() for t in torch.load(out / "model.pt", map_location="cpu").values())
