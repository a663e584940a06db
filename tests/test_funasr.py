"""The FunASR provider end to end, on real FunASR models built offline.

No FunASR model can be downloaded here, so a fixture builds tiny, randomly initialised
Paraformer and SenseVoiceSmall models from FunASR's own registered classes and saves them
as FunASR model directories (config.yaml, model.pt, tokens.json, an identity am.mvn).
The hub then serves them the normal way: config, worker process, ``AutoModel(model=dir)``.
Their text is gibberish, so these tests check the real path (load, shared memory, options,
pool, respawn, side by side with whisper, offline refusal), and that the hub's answer is
exactly what ``AutoModel.generate`` gives for the same audio in this process.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("funasr", reason="the funasr extra is not installed (make install EXTRAS=funasr)")

import torch
import yaml
from funasr import AutoModel
from funasr.register import tables

from hub.audio import to_pcm
from hub.errors import BadRequest, ProviderUnavailable
from hub.protocol import WorkerSpec
from tests.conftest import DATA, Hub, reference, start_hub, word_error_rate
from workers.funasr import clean_text, resolve_model, to_segment

pytestmark = pytest.mark.timeout(180)

TOKENS = ["<blank>", "<s>", "</s>", *"abcdefghijklmnopqrstuvwxyz", "<unk>"]
N_MELS, LFR_M, DIM = 80, 7, 16
FRONTEND = {
    "fs": 16000,
    "window": "hamming",
    "n_mels": N_MELS,
    "frame_length": 25,
    "frame_shift": 10,
    "lfr_m": LFR_M,
    "lfr_n": 6,
    "dither": 0.0,
}
_ATTENTION = {
    "attention_heads": 2,
    "linear_units": 32,
    "num_blocks": 2,
    "dropout_rate": 0.0,
    "positional_dropout_rate": 0.0,
}
_SANM = {
    **_ATTENTION,
    "output_size": DIM,
    "attention_dropout_rate": 0.0,
    "input_layer": "pe",
    "pos_enc_class": "SinusoidalPositionEncoder",
    "normalize_before": True,
    "kernel_size": 11,
    "sanm_shfit": 0,
    "selfattention_layer_type": "sanm",
}
# config.yaml of each tiny model: FunASR's real layouts, with two small layers each
CONFIGS: dict[str, dict[str, Any]] = {
    "paraformer": {
        "model": "Paraformer",
        "model_conf": {"ctc_weight": 0.0, "predictor_weight": 1.0, "predictor_bias": 1, "sampling_ratio": 0.75},
        "encoder": "SANMEncoder",
        "encoder_conf": _SANM,
        "decoder": "ParaformerSANMDecoder",
        "decoder_conf": {
            **_ATTENTION,
            "self_attention_dropout_rate": 0.0,
            "src_attention_dropout_rate": 0.0,
            "att_layer_num": 2,
            "kernel_size": 11,
            "sanm_shfit": 0,
        },
        "predictor": "CifPredictorV2",
        "predictor_conf": {"idim": DIM, "threshold": 1.0, "l_order": 1, "r_order": 1, "tail_threshold": 0.45},
        "frontend": "WavFrontend",
        "frontend_conf": FRONTEND,
        "tokenizer": "CharTokenizer",
        "tokenizer_conf": {"unk_symbol": "<unk>"},
    },
    "sensevoice": {
        "model": "SenseVoiceSmall",
        "model_conf": {"length_normalized_loss": True, "sos": 1, "eos": 2, "ignore_id": -1},
        "encoder": "SenseVoiceEncoderSmall",
        "encoder_conf": {**_SANM, "tp_blocks": 1},
        "frontend": "WavFrontend",
        "frontend_conf": FRONTEND,
        "tokenizer": "CharTokenizer",
        "tokenizer_conf": {"unk_symbol": "<unk>"},
    },
}
_NOT_MODEL_ARGS = ("model", "model_conf", "frontend", "frontend_conf", "tokenizer", "tokenizer_conf")


def identity_mvn(dim: int) -> str:
    """An ``am.mvn`` in Kaldi nnet text form that shifts by 0 and scales by 1."""
    zeros, ones = " ".join(["0"] * dim), " ".join(["1"] * dim)
    return (
        f"<Nnet>\n<Splice> {dim} {dim}\n[ 0 ]\n<AddShift> {dim} {dim}\n<LearnRateCoef> 0 [ {zeros} ]\n"
        f"<Rescale> {dim} {dim}\n<LearnRateCoef> 0 [ {ones} ]\n</Nnet>\n"
    )


def build_tiny_model(kind: str, out: Path) -> Path:
    """Save a randomly initialised FunASR model of ``kind`` as a model directory ``AutoModel`` loads."""
    config = CONFIGS[kind]
    torch.manual_seed(0)  # the same weights, so the same gibberish, on every run
    model_class = tables.model_classes[config["model"]]
    args = {k: v for k, v in config.items() if k not in _NOT_MODEL_ARGS}
    model = model_class(**args, **config["model_conf"], input_size=N_MELS * LFR_M, vocab_size=len(TOKENS))
    out.mkdir(parents=True)
    torch.save(model.state_dict(), out / "model.pt")
    (out / "config.yaml").write_text(yaml.safe_dump(config))
    (out / "tokens.json").write_text(json.dumps(TOKENS))
    (out / "am.mvn").write_text(identity_mvn(N_MELS * LFR_M))
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("funasr-models")
    return {kind: build_tiny_model(kind, root / kind) for kind in CONFIGS}


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory, models: dict[str, Path]) -> Iterator[Hub]:
    """One supervisor serving a Paraformer pool of two, a SenseVoiceSmall pool and whisper, side by side."""
    cpu = {"device": "cpu", "cpu_threads": 1}
    providers = {
        "funasr": {**cpu, "model": str(models["paraformer"]), "pool": {"min_size": 2, "max_size": 2}},
        "sensevoice": {**cpu, "type": "funasr", "model": str(models["sensevoice"]), "options": {"language": "en"}},
        "whisper": {**cpu, "model": "tiny.en"},
    }
    started = start_hub(tmp_path_factory.mktemp("funasr-hub"), providers)
    yield started
    assert started.stop() == 0, started.log()


def direct_text(model_dir: Path, pcm: np.ndarray, **options: Any) -> str:
    """What FunASR itself answers for ``pcm``, loaded the way the worker loads it."""
    model = AutoModel(model=str(model_dir), device="cpu", ncpu=1, disable_update=True, disable_pbar=True)
    return clean_text(model.generate(input=pcm, **options)[0]["text"])[0]


@pytest.mark.parametrize(
    ("provider", "kind", "defaults"), [("funasr", "paraformer", {}), ("sensevoice", "sensevoice", {"language": "en"})]
)
def test_transcription_through_shared_memory_matches_funasr_itself(
    hub: Hub, models: dict[str, Path], provider: str, kind: str, defaults: dict[str, Any]
) -> None:
    pcm = to_pcm(DATA / "hello.wav")
    with hub.client() as client:
        result = client.transcribe(pcm, provider)
    assert isinstance(result.text, str) and result.text
    assert result.text == direct_text(models[kind], pcm, **defaults)
    assert result.provider == provider and result.worker.startswith(f"{provider}-") and result.inference_ms > 0
    assert result.duration == pytest.approx(pcm.size / 16000)
    assert [(s.start, s.end, s.text) for s in result.segments] == [(0.0, round(result.duration, 3), result.text)]
    status = hub.status()
    assert status["hub"]["inline_bytes"] == 0, "shared-memory PCM must not cross the supervisor"
    assert {w["device"] for w in status["providers"][provider]["workers"]} == {"cpu"}


def test_options_reach_the_model_and_unknown_ones_are_refused(hub: Hub, models: dict[str, Path]) -> None:
    pcm = to_pcm(DATA / "coffee.wav")
    with hub.client() as client:
        assert isinstance(client.transcribe(pcm, "funasr", hotword="coffee", batch_size_s=60).text, str)
        sense = client.transcribe(pcm, "sensevoice", language="zh", use_itn=True)
        # the request's language overrides the provider's default "en", and reaches the model
        assert sense.language == "zh"
        assert sense.text == direct_text(models["sensevoice"], pcm, language="zh", use_itn=True)
        with pytest.raises(BadRequest, match="hotword"):
            client.transcribe(pcm, "sensevoice", hotword="coffee")  # only Paraformers take hotwords
        stream = client.transcribe_stream(pcm, "funasr")
        segments = list(stream)
    assert stream.transcript is not None and segments == list(stream.transcript.segments) and len(segments) == 1


def test_concurrent_requests_use_both_funasr_workers(hub: Hub) -> None:
    pcm = to_pcm(DATA / "stella.wav")
    texts: list[str] = []
    workers: set[str] = set()
    with hub.client() as client:

        def run() -> None:
            result = client.transcribe(pcm, "funasr")
            texts.append(result.text)
            workers.add(result.worker)

        threads = [threading.Thread(target=run) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert len(texts) == 8 and len(set(texts)) == 1, "the same audio must give the same text on every worker"
    assert len(workers) == 2 and all(w.startswith("funasr-") for w in workers)


def test_whisper_and_funasr_served_at_the_same_time(hub: Hub) -> None:
    results: dict[str, Any] = {}
    with hub.client() as client:

        def run(provider: str) -> None:
            results[provider] = client.transcribe(DATA / "coffee.wav", provider)

        threads = [threading.Thread(target=run, args=(p,)) for p in ("whisper", "funasr", "sensevoice")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert word_error_rate(reference("coffee"), results["whisper"].text) <= 0.10
    assert results["whisper"].worker.startswith("whisper-")
    assert results["funasr"].worker.startswith("funasr-") and results["sensevoice"].worker.startswith("sensevoice-")


def _wait_for(condition: Any, hub: Hub, timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while not (status := condition(hub.status())):
        assert time.monotonic() < deadline, hub.log()
        time.sleep(0.2)
    return status


def test_a_killed_funasr_worker_is_replaced_and_the_replacement_serves(hub: Hub) -> None:
    before = hub.status()["providers"]["funasr"]["workers"]
    victim = before[0]
    os.kill(victim["pid"], signal.SIGKILL)

    def replaced(status: dict[str, Any]) -> dict[str, Any] | None:
        workers = status["providers"]["funasr"]["workers"]
        ready = [w for w in workers if w["state"] == "idle"]
        return status if len(ready) == 2 and victim["id"] not in {w["id"] for w in workers} else None

    status = _wait_for(replaced, hub)
    new = {w["id"] for w in status["providers"]["funasr"]["workers"]} - {w["id"] for w in before}
    assert len(new) == 1
    with hub.client() as client:
        served = {client.transcribe(DATA / "hello.wav", "funasr").worker for _ in range(4)}
    assert new <= served, f"the replacement {new} served nothing ({served})"
    assert "killed by SIGKILL" in hub.log()


def test_a_hub_model_name_without_allow_download_fails_fast(hub_factory) -> None:
    started = time.monotonic()
    hub = hub_factory({"funasr": {"model": "paraformer-zh", "device": "cpu"}}, ready=False)
    with hub.client() as client, pytest.raises(ProviderUnavailable, match="allow_download") as refused:
        client.transcribe(DATA / "hello.wav", "funasr", timeout=10)
    assert time.monotonic() - started < 5.0, "refusing a hub name must not wait for FunASR's download retries"
    assert "paraformer-zh" in str(refused.value) and "not a local directory" in str(refused.value)
    assert "allow_download" in hub.status()["providers"]["funasr"]["last_error"]


# --- the adapter's pure parts ---------------------------------------------------------


def _spec(model: str, allow_download: bool = False) -> WorkerSpec:
    return WorkerSpec(
        id="funasr-1",
        provider="funasr",
        type="funasr",
        model=model,
        device="cpu",
        compute_type="auto",
        cpu_threads=1,
        backend="ipc:///nowhere",
        shm_prefix="asrhub_x_",
        heartbeat_interval=1.0,
        options={},
        allow_download=allow_download,
    )


def test_resolve_model_is_offline_first(tmp_path: Path, models: dict[str, Path]) -> None:
    assert resolve_model(_spec(str(models["paraformer"]))) == str(models["paraformer"])
    assert resolve_model(_spec("paraformer-zh", allow_download=True)) == "paraformer-zh"
    with pytest.raises(RuntimeError, match="providers.funasr.allow_download: true"):
        resolve_model(_spec("paraformer-zh"))
    with pytest.raises(RuntimeError, match="has no config.yaml"):
        resolve_model(_spec(str(tmp_path)))


def test_sensevoice_tags_are_stripped_and_timestamps_become_the_segment_span() -> None:
    assert clean_text("<|en|><|NEUTRAL|><|Speech|><|woitn|>hello there") == ("hello there", "en")
    assert clean_text("plain text") == ("plain text", None)
    result = {"text": "ni hao", "timestamp": [[120, 400], [400, 910]]}
    segment = to_segment(result, "ni hao", 2.0)
    assert (segment.start, segment.end, segment.text) == (0.12, 0.91, "ni hao")
    assert (to_segment({"text": "x"}, "x", 2.5).start, to_segment({"text": "x"}, "x", 2.5).end) == (0.0, 2.5)
