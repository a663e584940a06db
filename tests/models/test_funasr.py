"""The FunASR provider end to end, on real FunASR models built offline.

No FunASR model can be downloaded here, so a fixture builds tiny, randomly initialised
Paraformer, streaming Paraformer and SenseVoiceSmall models from FunASR's own registered
classes and saves them as FunASR model directories (config.yaml, model.pt, tokens.json, an
identity am.mvn). The hub then serves them the normal way: config, worker process,
``AutoModel(model=dir)``. Their text is gibberish, so these tests check the real path (load,
shared memory, options, pool, respawn, live sessions, side by side with whisper, offline
refusal), and that the hub's answer is exactly what FunASR (or the adapter) gives for the same
audio in this process.
"""

from __future__ import annotations

import importlib.util
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
import yaml

from hub import shm
from hub.audio import to_pcm
from hub.client.session import StreamEvent
from hub.errors import BadRequest, ProviderUnavailable
from hub.protocol import WorkerSpec
from tests.conftest import CLIPS, DATA, Hub, extras_required, reference, start_hub, word_error_rate
from workers.engine import DecodeItem, EngineResult, StreamSettings
from workers.funasr import FunASREngine, clean_text, resolve_model, to_segment, to_words
from workers.streaming import StreamUpdate

if importlib.util.find_spec("funasr") is None and not extras_required():
    # a developer's whisper-only venv skips these; under `make test` (ASR_HUB_REQUIRE_EXTRAS=1) and CI a missing
    # extra fails the tests that import it instead
    pytest.skip("the funasr extra is not installed (make install EXTRAS=funasr)", allow_module_level=True)

pytestmark = pytest.mark.timeout(420)  # the first test also waits for the module hub (up to 300 s)

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
_PARAFORMER: dict[str, Any] = {
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
}
# config.yaml of each tiny model: FunASR's real layouts, with two small layers each
CONFIGS: dict[str, dict[str, Any]] = {
    "paraformer": _PARAFORMER,
    # paraformer-zh-streaming's layout: the chunked encoder (600 ms chunks, 300 ms look-ahead)
    "online": {
        **_PARAFORMER,
        "model": "ParaformerStreaming",
        "encoder": "SANMEncoderChunkOpt",
        "encoder_conf": {
            **_SANM,
            "input_layer": "pe_online",
            "chunk_size": [12, 15],
            "stride": [8, 10],
            "pad_left": [0, 0],
            "encoder_att_look_back_factor": [4, 4],
            "decoder_att_look_back_factor": [1, 1],
        },
        "decoder_conf": {**_PARAFORMER["decoder_conf"], "sanm_shfit": 5},
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
# SeACo-Paraformer (speech_seaco_paraformer's layout): a Paraformer whose bias decoder attends to the hotwords, so a
# hotword changes its output even with random weights, where a plain Paraformer ignores it
CONFIGS["seaco"] = {
    **_PARAFORMER,
    "model": "SeacoParaformer",
    "model_conf": {
        **_PARAFORMER["model_conf"],
        "inner_dim": DIM,
        "bias_encoder_type": "lstm",
        "seaco_decoder": "ParaformerSANMDecoder",
        "seaco_decoder_conf": {
            **_PARAFORMER["decoder_conf"],
            "num_blocks": 1,
            "att_layer_num": 1,
            "use_output_layer": False,
        },
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
    import torch  # FunASR and torch load in the test process only where used: not when pytest collects the file
    from funasr.register import tables

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
    """One supervisor serving a Paraformer pool of two, a streaming Paraformer, a SenseVoiceSmall pool and
    whisper, side by side."""
    cpu = {"device": "cpu", "cpu_threads": 1}
    one = {"min_size": 1, "max_size": 1, "sessions_per_worker": 3}  # one worker, serving several live sessions at once
    providers = {
        "funasr": {**cpu, "model": str(models["paraformer"]), "pool": {"min_size": 2, "max_size": 2}},
        "funasr-online": {**cpu, "type": "funasr", "model": str(models["online"]), "pool": one},
        "sensevoice": {
            **cpu,
            "type": "funasr",
            "model": str(models["sensevoice"]),
            "options": {"language": "en"},
            "pool": one,
        },
        "whisper": {**cpu, "model": "tiny.en"},
    }
    # five workers load torch and their models at once: on 2 cores beside the suite's other processes that
    # takes minutes, not the usual hub's seconds
    started = start_hub(tmp_path_factory.mktemp("funasr-hub"), providers, hub={"start_timeout": 300}, ready_timeout=300)
    yield started
    started.finish()


def auto_model(model_dir: Path) -> Any:
    """FunASR's own model, loaded the way the worker loads it."""
    from funasr import AutoModel

    return AutoModel(model=str(model_dir), device="cpu", ncpu=1, disable_update=True, disable_pbar=True)


def direct_text(model_dir: Path, pcm: np.ndarray, **options: Any) -> str:
    """What FunASR itself answers for ``pcm``."""
    model = auto_model(model_dir)
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
        sense = client.transcribe(pcm, "sensevoice", language="zh", use_itn=True)
        # the request's language overrides the provider's default "en", and reaches the model
        assert sense.language == "zh"
        assert sense.text == direct_text(models["sensevoice"], pcm, language="zh", use_itn=True)
        with pytest.raises(BadRequest, match="hotword"):
            client.transcribe(pcm, "sensevoice", hotword="coffee")  # only Paraformers take hotwords
        stream = client.transcribe_stream(pcm, "funasr")
        segments = list(stream)
    assert stream.transcript is not None and segments == list(stream.transcript.segments) and len(segments) == 1


def test_a_hotword_reaches_the_model_through_the_hub(hub_factory: Any, models: dict[str, Path]) -> None:
    """On a SeACo-Paraformer a hotword changes the text, so a worker that dropped it would answer the text
    without it: the hub's answer is FunASR's own with the hotword, and differs from it without."""
    pcm = to_pcm(DATA / "coffee.wav")
    hub = hub_factory({"seaco": {"type": "funasr", "device": "cpu", "cpu_threads": 1, "model": str(models["seaco"])}})
    with hub.client() as client:
        hot = client.transcribe(pcm, hotword="coffee", batch_size_s=60)
        plain = client.transcribe(pcm)
    with_it, without = direct_text(models["seaco"], pcm, hotword="coffee"), direct_text(models["seaco"], pcm)
    assert with_it != without, "the hotword made no difference to FunASR itself: the test proves nothing"
    assert (hot.text, plain.text) == (with_it, without)


def test_every_option_reaches_the_models_own_inference(models: dict[str, Path]) -> None:
    """``batch_size_s`` only acts where FunASR cuts the audio with a VAD model, so its effect cannot be seen
    here: the adapter is checked to hand it, and the hotword, to the model's own ``inference`` (the call
    FunASR makes with the options merged), and a plain Paraformer's text stays FunASR's own."""
    engine = FunASREngine(_spec(str(models["paraformer"])))
    seen: list[dict[str, Any]] = []
    inference = engine._model.model.inference

    def recording(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs)
        return inference(*args, **kwargs)

    engine._model.model.inference = recording
    pcm = to_pcm(DATA / "coffee.wav")
    result = engine.transcribe(pcm, {"hotword": "coffee", "batch_size_s": 60}, lambda segment: None)
    assert seen and seen[-1]["hotword"] == "coffee" and seen[-1]["batch_size_s"] == 60, seen
    assert result.text == direct_text(models["paraformer"], pcm, hotword="coffee", batch_size_s=60)


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


def test_whisper_and_funasr_served_at_the_same_time(hub: Hub, models: dict[str, Path]) -> None:
    """The FunASR jobs are sent while whisper's is on its worker, and they are answered before it: one pool
    does not wait for the other. (Intervals of inference time would need the whisper worker to have started
    decoding when the status says busy; under load it may still be reading the request then.)"""
    speech = np.concatenate([to_pcm(DATA / f"{c}.wav") for c in ("coffee", "stella", "weather")])
    pcm = to_pcm(DATA / "coffee.wav")
    results: dict[str, Any] = {}
    ran: dict[str, float] = {}
    with hub.client() as client:

        def run(provider: str, audio: np.ndarray) -> None:
            result = client.transcribe(audio, provider, timeout=120)
            done = time.monotonic()
            results[provider] = result
            ran[provider] = done

        whisper = threading.Thread(target=run, args=("whisper", speech))
        whisper.start()
        _wait_for(lambda s: any(w["state"] == "busy" for w in s["providers"]["whisper"]["workers"]), hub)
        others = [threading.Thread(target=run, args=(p, pcm)) for p in ("funasr", "sensevoice")]
        for t in others:
            t.start()
        for t in (whisper, *others):
            t.join(120)
    assert not [t for t in (whisper, *others) if t.is_alive()], "a request thread did not finish in 120 s"
    assert set(results) == {"whisper", "funasr", "sensevoice"}, results
    references = " ".join(reference(c) for c in ("coffee", "stella", "weather"))
    assert word_error_rate(references, results["whisper"].text) <= 0.10, results["whisper"].text
    assert results["funasr"].text == direct_text(models["paraformer"], pcm)
    assert results["sensevoice"].text == direct_text(models["sensevoice"], pcm, language="en")
    for provider in ("funasr", "sensevoice"):
        assert results[provider].worker.startswith(f"{provider}-")
        assert ran[provider] < ran["whisper"], ran  # answered while whisper's job was still running


# --- live sessions ---------------------------------------------------------------------

CHUNK = 1600  # 100 ms, as a microphone sends it
ONLINE_CHUNK = 9600  # the streaming Paraformer's default chunk: chunk_size[1] = 10 frames of 60 ms


def stream_in_process(
    model_dir: Path, pcm: np.ndarray, options: dict[str, Any]
) -> tuple[list[StreamUpdate], StreamUpdate, list[int]]:
    """What the adapter itself gives for ``pcm`` fed in 100 ms chunks and stepped when due: the updates of
    every step, that of ``finish``, and after which chunk each step came."""
    streamer = FunASREngine(_spec(str(model_dir), options=options)).open_stream(dict(options), StreamSettings())
    steps, after = [], []
    for index, start in enumerate(range(0, pcm.size, CHUNK)):
        streamer.feed(pcm[start : start + CHUNK])
        if streamer.due:
            steps.append(streamer.step())
            after.append(index)
    return steps, streamer.finish(), after


@pytest.mark.parametrize(
    ("provider", "kind", "defaults"),
    [("funasr", "paraformer", {}), ("sensevoice", "sensevoice", {"language": "en"}), ("funasr-online", "online", {})],
)
def test_a_live_session_gives_what_the_adapter_gives_in_process(
    hub: Hub, models: dict[str, Path], provider: str, kind: str, defaults: dict[str, Any]
) -> None:
    """Offline models take the window rule (Paraformer on its timestamps, SenseVoice on text spread evenly),
    the streaming one its own chunked decoding; through the hub, each gives exactly the in-process answer."""
    pcm = to_pcm(DATA / "stella.wav")
    steps, last, after = stream_in_process(models[kind], pcm, defaults)
    prefix = shm.hub_prefix(hub.status()["hub"]["id"])
    events: list[StreamEvent] = []
    with hub.client() as client:
        session = client.open_stream(provider)
        reader = threading.Thread(target=lambda: events.extend(session.results()))
        reader.start()
        deadline = time.monotonic() + 60
        for index, start in enumerate(range(0, pcm.size, CHUNK)):
            session.send(pcm[start : start + CHUNK])
            if index in after:  # the worker decodes what has come; wait for it, so it steps where the adapter did
                while sum(e.kind == "partial" for e in list(events)) < after.index(index) + 1:
                    assert time.monotonic() < deadline, f"{len(events)} events of {len(steps)} steps:\n{hub.log()}"
                    time.sleep(0.01)
        before_close = list(events)
        transcript = session.close()
        reader.join(30)
    assert not reader.is_alive()
    assert [e.text for e in before_close if e.kind == "partial"] == [u.partial for u in steps]
    assert [e.text for e in before_close if e.kind == "final"] == [u.final.text for u in steps if u.final]
    finals = [u.final for u in (*steps, last) if u.final]
    assert [(s.start, s.end, s.text) for s in transcript.segments] == [(f.start, f.end, f.text) for f in finals]
    assert transcript.text and transcript.text == " ".join(e.text for e in events if e.kind == "final")
    assert transcript.duration == pytest.approx(pcm.size / 16000, abs=0.01)
    assert hub.status()["hub"]["inline_bytes"] == 0, "the session's audio must travel through its ring"
    assert not shm.list_segments(prefix)


def test_a_streaming_model_decodes_chunk_by_chunk_through_its_cache(hub: Hub, models: dict[str, Path]) -> None:
    pcm = to_pcm(DATA / "stella.wav")
    steps, last, _ = stream_in_process(models["online"], pcm, {})
    # every 600 ms chunk is decoded as soon as it is complete, and what it gives is final at once
    assert len(steps) == pcm.size // ONLINE_CHUNK and all(u.partial == "" for u in steps)
    spans = [(u.final.start, u.final.end) for u in steps if u.final]
    assert spans and all(round(end - start, 3) == 0.6 and round(start / 0.6, 6).is_integer() for start, end in spans)
    assert last.final is not None and last.final.end == round(pcm.size / 16000, 3)
    # FunASR's own answer, the whole clip through one cache and flushed, is the chunks' text run together
    # (less spaces: FunASR's postprocessing spaces the words of each call)
    model = auto_model(models["online"])
    kwargs = {"encoder_chunk_look_back": 4, "decoder_chunk_look_back": 1}
    whole = model.generate(input=pcm, cache={}, is_final=True, chunk_size=[0, 10, 5], **kwargs)[0]["text"]
    assert "".join("".join(u.final.text for u in (*steps, last) if u.final).split()) == "".join(whole.split())
    smaller = model.generate(input=pcm, cache={}, is_final=True, chunk_size=[0, 8, 4], **kwargs)[0]["text"]
    with hub.client() as client:
        assert client.transcribe(pcm, "funasr-online").text == whole  # one-shot runs to the end of the audio too
        assert client.transcribe(pcm, "funasr-online", chunk_size=[0, 8, 4]).text == smaller
        with pytest.raises(BadRequest, match="chunk_size must be"):
            client.transcribe(pcm, "funasr-online", chunk_size=[0, 0, 5])
        with pytest.raises(BadRequest, match="chunk_size"):
            client.transcribe(pcm, "funasr", chunk_size=[0, 10, 5])  # an offline model has no chunks


def test_a_streaming_model_keeps_one_cache_per_session_on_one_worker(hub: Hub, models: dict[str, Path]) -> None:
    """Three sessions of different clips on the streaming Paraformer's one worker, their chunks interleaved:
    each session's text is exactly that of its clip streamed alone (a shared cache would mix them). Sent
    faster than real time, a decode may take several chunks at once, so the texts compare run together."""
    clips = [to_pcm(DATA / f"{name}.wav") for name in ("stella", "hello", "coffee")]
    expected = []
    for pcm in clips:
        steps, last, _ = stream_in_process(models["online"], pcm, {})
        expected.append("".join(u.final.text for u in (*steps, last) if u.final))
    with hub.client() as client:
        sessions = [client.open_stream("funasr-online") for _ in clips]
        assert len({s.worker for s in sessions}) == 1
        for start in range(0, max(p.size for p in clips), CHUNK):
            for session, pcm in zip(sessions, clips, strict=False):
                if start < pcm.size:
                    session.send(pcm[start : start + CHUNK])
        transcripts = [session.close() for session in sessions]
    assert ["".join(seg.text for seg in t.segments) for t in transcripts] == expected


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
    """The worker refuses the hub name itself, before FunASR tries (and retries) a download."""
    hub = hub_factory({"funasr": {"model": "paraformer-zh", "device": "cpu"}}, ready=False)
    _wait_for(lambda s: "allow_download" in s["providers"]["funasr"]["last_error"], hub)
    with hub.client() as client, pytest.raises(ProviderUnavailable, match="allow_download") as refused:
        client.transcribe(DATA / "hello.wav", "funasr", timeout=10)
    assert "paraformer-zh" in str(refused.value) and "not a local directory" in str(refused.value)
    assert (
        "exit status 4 (failed to load its model): funasr model 'paraformer-zh' is not a local directory" in hub.log()
    )


# --- the adapter's pure parts ---------------------------------------------------------


def _spec(model: str, allow_download: bool = False, options: dict[str, Any] | None = None) -> WorkerSpec:
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
        options=options or {},
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


def test_words_take_the_models_timestamps_where_it_gives_one_a_word_else_are_spread_evenly() -> None:
    stamped = to_words({"text": "ni hao", "timestamp": [[120, 400], [400, 910]]}, 2.0)
    assert [(w.start, w.end, w.word) for w in stamped] == [(0.12, 0.4, "ni"), (0.4, 0.91, " hao")]
    spread = to_words({"text": "<|zh|><|NEUTRAL|>欢迎 hello", "timestamp": [[0, 500]]}, 1.5)
    assert [(w.start, w.end, w.word) for w in spread] == [(0.0, 0.5, "欢"), (0.5, 1.0, "迎"), (1.0, 1.5, " hello")]
    assert "".join(w.word for w in spread) == "欢迎 hello" and to_words({"text": ""}, 1.0) == []


def test_a_long_recording_is_split_across_the_funasr_pool_and_stitched_in_order(
    hub: Hub, models: dict[str, Path]
) -> None:
    """75 s of speech with pauses (the default pool.split_over_seconds is 60): each piece of the plan is what
    FunASR itself answers for that stretch, at that place in the audio."""
    from workers.cutting import plan, silero_vad

    clips = [to_pcm(DATA / f"{name}.wav") for name in ("coffee", "stella", "weather")]
    gap = np.zeros(int(0.7 * 16000), np.float32)
    pcm = np.concatenate([part for _ in range(6) for clip in clips for part in (clip, gap)])[: 75 * 16000]
    pieces = [p for p in plan(pcm, 30 * 16000, silero_vad) if p.speech]
    with hub.client(timeout=120) as client:
        serving = {w["id"] for w in client.status()["providers"]["funasr"]["workers"] if w["state"] in ("idle", "busy")}
        result = client.transcribe(pcm, "funasr")
    # the pieces ran on the pool's workers (an earlier test of this module may have replaced one: ids from status;
    # which of the two takes a piece is the queue's choice, so one may take them all while the other is busy)
    assert result.extra["pieces"] >= 3 and set(result.worker.split(",")) <= serving and len(serving) == 2
    assert [(s.start, s.end, s.text) for s in result.segments] == [
        (round(p.start / 16000, 3), round(p.end / 16000, 3), direct_text(models["paraformer"], pcm[p.start : p.end]))
        for p in pieces
    ]


# --- batches: one generate over a list (the batching issue) ---------------------------


def test_funasr_decodes_a_batch_in_one_generate_and_only_padding_can_change_a_shorter_jobs_tail(
    models: dict[str, Path],
) -> None:
    """FunASR pads a batch to its longest audio. Here (a tiny Paraformer with random weights) that changed the
    last tokens of one of the four clips (weather, padded from 3.9 s to stella's 4.7 s): the longest clip, and
    any batch of equal lengths, decode exactly as alone; the others are compared by their common prefix."""
    engine = FunASREngine(_spec(str(models["paraformer"])))
    calls: list[int] = []
    generate = engine._model.generate
    engine._model.generate = lambda **kw: (
        calls.append(len(kw["input"]) if isinstance(kw["input"], list) else 1),
        generate(**kw),
    )[1]
    clips = [to_pcm(DATA / f"{name}.wav") for name in CLIPS]
    alone = [engine.transcribe(pcm, {}, lambda s: None) for pcm in clips]
    calls.clear()
    batched = engine.transcribe_batch([DecodeItem(pcm, {}) for pcm in clips])
    assert calls == [len(clips)]
    texts = [b.text for b in batched if isinstance(b, EngineResult)]
    longest = max(range(len(clips)), key=lambda i: clips[i].size)
    assert texts[longest] == alone[longest].text
    for text, one in zip(texts, alone, strict=True):
        same = next(
            (i for i, (x, y) in enumerate(zip(text, one.text, strict=False)) if x != y), min(len(text), len(one.text))
        )
        assert same >= 0.75 * len(one.text), f"batched {text!r} and alone {one.text!r} part before their tails"
    twice = engine.transcribe_batch([DecodeItem(clips[0], {}), DecodeItem(clips[0], {})])
    assert [t.text for t in twice if isinstance(t, EngineResult)] == [alone[0].text] * 2
