"""Several whisper decodes in one forward pass: one ``encode`` over their feature windows, one
``generate`` over their prompts, one ``align`` for their word timings.

This is the core of faster-whisper 1.2's ``BatchedInferencePipeline.forward``, applied to windows of
*different* jobs instead of one file's VAD chunks. It reproduces what ``WhisperModel.transcribe``
does for a clip that fits one window, step by step (the same features, prompt, first-temperature
settings, segment split and word timings), so a batched job gets the words it would get alone up to
float rounding. Where ``transcribe`` would do more than one decode of one window, the job is handed
back to be decoded alone (``window_batch`` returns ``None`` for it), so the answer still matches:

- audio longer than one window (the windows of one recording depend on each other's text),
- a first try the temperature fallback rejects (too repetitive, too unlikely) while others remain,
- a window whose text stops before its end (``transcribe`` would decode the rest again), except a piece of a
  long recording (``DecodeItem.piece``): it was cut at a pause, so the rest is the end of its speech and the
  silence after it, and its text after the last timestamp is kept as its last segment (``_tail``) instead: one
  pass per piece, alone or batched,
- options this path does not reproduce: ``vad_filter``, sampling at the first temperature, and a
  multilingual model asked to detect the language.

A job's window is padded to Whisper's 30 s, as ``transcribe`` pads it. A piece's is padded only up to its next
whole ``PIECE_PAD_S`` (``encoder_frames``): CTranslate2's encoder takes the shorter input and its cost follows its
length, and pieces (15-30 s at the default ``split_piece_seconds``) are mostly shorter than 30 s. Measured on the
long-audio benchmark's 5-minute recording (bench/README.md, "Pieces padded to their length"): split on two
workers 2.5x split off where it was 1.9x, WER 0.088 against 0.097. Items share a pass only with items of the
same padding (``by_padding``), so a piece's words do not depend on what it is batched with.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np

from hub.protocol import SAMPLE_RATE
from hub.results import Segment, Word, join_text
from workers.batch import groups
from workers.engine import DecodeItem, EngineResult

PIECE_PAD_S = 1  # seconds: a piece's audio is padded up to a multiple of this for the encoder, not to 30 s


def settings(model: Any, options: dict[str, Any]) -> dict[str, Any]:
    """``transcribe``'s arguments for ``options``: its own defaults, overridden by the options."""
    defaults = {
        name: p.default
        for name, p in inspect.signature(model.transcribe).parameters.items()
        if p.default is not p.empty
    }
    merged = {**defaults, **options}
    temperature = merged["temperature"]
    merged["temperatures"] = list(temperature) if isinstance(temperature, (list, tuple)) else [temperature]
    return merged


def batchable(model: Any, run: dict[str, Any]) -> bool:
    """Whether the options allow the one-window path at all (per-job conditions are checked in ``window_batch``)."""
    return (
        not run["vad_filter"]
        and run["temperatures"][0] == 0
        and not run["multilingual"]
        and run["clip_timestamps"] in ("0", [0], [0.0])
        and run["hallucination_silence_threshold"] is None
        and run["max_new_tokens"] is None
        and (run["language"] is not None or not model.model.is_multilingual)
    )


def encoder_frames(item: DecodeItem, hop_length: int, max_frames: int) -> int:
    """The feature frames the encoder hears for ``item``: ``max_frames`` (30 s) for a job, a piece's audio padded
    up to a multiple of ``PIECE_PAD_S``."""
    if not item.piece:
        return max_frames
    bucket = round(PIECE_PAD_S * SAMPLE_RATE / hop_length)
    content = item.pcm.size // hop_length + 1
    return min(max_frames, -(-content // bucket) * bucket)


def by_padding(items: Sequence[DecodeItem], hop_length: int, max_frames: int) -> list[list[int]]:
    """The indices of ``items`` grouped by their encoder input's length (``encoder_frames``), in order."""
    return groups(items, lambda item: encoder_frames(item, hop_length, max_frames))


def window_batch(model: Any, items: Sequence[DecodeItem], options: dict[str, Any]) -> list[EngineResult | None]:
    """Decode ``items`` (all with ``options`` and one ``encoder_frames``) in one pass; ``None`` for an item that
    must be decoded alone."""
    from faster_whisper.audio import pad_or_trim
    from faster_whisper.tokenizer import Tokenizer
    from faster_whisper.transcribe import get_compression_ratio, get_suppressed_tokens

    run = settings(model, options)
    extractor = model.feature_extractor
    features = [extractor(item.pcm) for item in items]
    frames = [f.shape[-1] - 1 for f in features]  # transcribe's content_frames
    fits = [i for i, n in enumerate(frames) if 0 < n <= extractor.nb_max_frames]
    results: list[EngineResult | None] = [None] * len(items)
    if len(fits) < 2 and not any(items[i].piece for i in fits):
        return results  # one job alone: transcribe is the same decode
    language = run["language"] if model.model.is_multilingual else "en"
    tokenizer = Tokenizer(model.hf_tokenizer, model.model.is_multilingual, task=run["task"], language=language)
    previous = tokenizer.encode(" " + run["initial_prompt"].strip()) if run["initial_prompt"] else []
    prompt = model.get_prompt(
        tokenizer,
        previous,
        without_timestamps=run["without_timestamps"],
        prefix=run["prefix"],
        hotwords=run["hotwords"],
    )
    suppress = run["suppress_tokens"]
    padded = encoder_frames(items[fits[0]], extractor.hop_length, extractor.nb_max_frames)
    encoded = model.encode(np.stack([pad_or_trim(features[i][:, : frames[i]], padded) for i in fits]))
    outputs = model.model.generate(
        encoded,
        [prompt] * len(fits),
        beam_size=run["beam_size"],
        patience=run["patience"],
        length_penalty=run["length_penalty"],
        repetition_penalty=run["repetition_penalty"],
        no_repeat_ngram_size=run["no_repeat_ngram_size"],
        max_length=model.max_length,
        return_scores=True,
        return_no_speech_prob=True,
        suppress_blank=run["suppress_blank"],
        suppress_tokens=get_suppressed_tokens(tokenizer, suppress) if suppress else suppress,
        max_initial_timestamp_index=int(round(run["max_initial_timestamp"] / model.time_precision)),
    )
    decoded = []  # (index, the window's segments, nothing heard, seek, single timestamp ending) per item kept
    tokens_of = {}
    for index, output in zip(fits, outputs, strict=True):
        tokens = tokens_of[index] = output.sequences_ids[0]
        avg_logprob = output.scores[0] * (len(tokens) ** run["length_penalty"]) / (len(tokens) + 1)
        if _falls_back(
            run, tokenizer.decode(tokens).strip(), avg_logprob, output.no_speech_prob, get_compression_ratio
        ):
            continue
        size = frames[index]
        segments, seek, single_ending = model._split_segments_by_timestamps(
            tokenizer=tokenizer,
            tokens=tokens,
            time_offset=0.0,
            segment_size=size,
            segment_duration=size * extractor.time_per_frame,
            seek=0,
        )
        if items[index].piece and not single_ending:
            segments += _tail(tokens, segments, tokenizer, model.time_precision, size * extractor.time_per_frame)
        silent = _no_speech(run, avg_logprob, output.no_speech_prob)
        decoded.append((index, segments, silent, seek, single_ending))
    if run["word_timestamps"] and decoded:
        _word_timings(model, tokenizer, encoded, fits, frames, decoded, tokens_of, run)
    for index, segments, silent, seek, single_ending in decoded:
        if not silent and run["word_timestamps"] and not single_ending:
            end = next((w["end"] for s in reversed(segments) for w in reversed(s["words"])), None)
            if end is not None and end > 0:
                seek = round(end * model.frames_per_second)
        if not silent and seek < frames[index] and not items[index].piece:
            continue  # transcribe would decode the rest of this window again: alone
        results[index] = _result(items[index], [] if silent else segments, tokenizer, run, language)
    return results


def _tail(
    tokens: list[int], segments: list[dict[str, Any]], tokenizer: Any, precision: float, duration: float
) -> list[dict[str, Any]]:
    """A piece's text after its last complete segment, as one more segment to the end of the piece (none if
    there is no text there). ``transcribe`` would decode the window again from the last timestamp to hear it;
    a piece ends at a pause, so what follows that timestamp is the end of its speech and silence."""
    rest = tokens[sum(len(s["tokens"]) for s in segments) :]
    if not any(t < tokenizer.eot for t in rest):
        return []
    start = (rest[0] - tokenizer.timestamp_begin) * precision if rest[0] >= tokenizer.timestamp_begin else 0.0
    return [{"seek": 0, "start": start, "end": max(start, duration), "tokens": rest}]


def _falls_back(run: dict[str, Any], text: str, avg_logprob: float, no_speech: float, ratio: Any) -> bool:
    """Whether ``generate_with_fallback`` would try the next temperature after this first try."""
    if len(run["temperatures"]) < 2:
        return False  # no other temperature: its first try is what it keeps
    needs = run["compression_ratio_threshold"] is not None and ratio(text) > run["compression_ratio_threshold"]
    low = run["log_prob_threshold"] is not None and avg_logprob < run["log_prob_threshold"]
    silence = run["no_speech_threshold"] is not None and no_speech > run["no_speech_threshold"] and low
    return (needs or low) and not silence


def _no_speech(run: dict[str, Any], avg_logprob: float, no_speech: float) -> bool:
    """``generate_segments``' no-voice check: the window is skipped without a segment."""
    if run["no_speech_threshold"] is None or no_speech <= run["no_speech_threshold"]:
        return False
    return not (run["log_prob_threshold"] is not None and avg_logprob > run["log_prob_threshold"])


def _word_timings(
    model: Any,
    tokenizer: Any,
    encoded: Any,
    fits: list[int],
    frames: list[int],
    decoded: list[tuple[int, list[dict[str, Any]], bool, int, bool]],
    tokens_of: dict[int, list[int]],
    run: dict[str, Any],
) -> None:
    """One ``align`` over the whole pass, then faster-whisper's own word placement for each item alone."""
    by_index = {index: segments for index, segments, *_ in decoded}
    # a kept item's segments' tokens, as transcribe aligns them; an item left to decode alone keeps its row
    rows = [[t for s in by_index[i] for t in s["tokens"]] if i in by_index else tokens_of[i] for i in fits]
    text_tokens = [[t for t in tokens if t < tokenizer.eot] for tokens in rows]
    alignments = model.find_alignment(tokenizer, text_tokens, encoded, [frames[i] for i in fits])
    for row, index in enumerate(fits):
        if index in by_index:
            place_words(
                model,
                by_index[index],
                tokenizer,
                alignments[row],
                frames[index],
                run["prepend_punctuations"],
                run["append_punctuations"],
            )


def place_words(
    model: Any,
    segments: list[dict[str, Any]],
    tokenizer: Any,
    alignment: list[dict[str, Any]],
    frames: int,
    prepend: str,
    append: str,
) -> None:
    """faster-whisper's own word placement for one window's ``segments``, given that window's row of a batch's
    alignment (``find_alignment`` over the batch). ``add_word_timestamps`` over a batch would carry the last
    spoken time from one window to the next: right for the chunks of one file, wrong for separate jobs or
    sessions, so it runs once per window, handed its row instead of aligning again."""
    from faster_whisper.transcribe import WhisperModel

    one = SimpleNamespace(find_alignment=lambda *args: [alignment], frames_per_second=model.frames_per_second)
    WhisperModel.add_word_timestamps(
        one, [segments], tokenizer, None, frames, prepend, append, last_speech_timestamp=0.0
    )


def _result(
    item: DecodeItem, segments: list[dict[str, Any]], tokenizer: Any, run: dict[str, Any], language: str
) -> EngineResult:
    """The item's answer as ``WhisperEngine.transcribe`` gives it, its segments streamed as they would be."""
    kept = []
    for raw in segments:
        text = tokenizer.decode(raw["tokens"])
        if raw["start"] == raw["end"] or not text.strip():
            continue
        words = tuple(Word(w["start"], w["end"], w["word"], w["probability"]) for w in raw.get("words") or ())
        segment = Segment(start=round(raw["start"], 3), end=round(raw["end"], 3), text=text.strip(), words=words)
        kept.append(segment)
        item.on_segment(segment)
    duration = item.pcm.shape[0] / SAMPLE_RATE
    return EngineResult(
        text=join_text(s.text for s in kept), segments=tuple(kept), language=language, duration=duration
    )
