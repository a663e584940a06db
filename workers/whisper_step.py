"""One live-session step on faster-whisper: one encode, one generate and one alignment of the window.

``WhisperModel.transcribe`` with word timings decodes a window twice whenever it ends inside a segment
(it seeks back to the last word and decodes the rest again), and retries at higher temperatures when a
decode looks poor: 1.66 encodes and 1.77 generates per step on the benchmark's clips (bench/README.md). A
step needs neither: the local-agreement rule only confirms words two decodes agree on, and the next step
decodes the tail again anyway. So a step here is exactly faster-whisper's core, called once: the window's
features (padded to 30 s as Whisper needs), the encoder, a beam search at the first temperature (with
timestamp tokens, as transcribe's first pass: without them tiny.en dropped repeated sentences in the
benchmark, 16 % WER against 7 %), and the cross-attention alignment that gives each word its start and end,
over every text token (the unfinished last segment included: local agreement confirms it later).

A window Whisper hears as silence (no-speech probability over ``NO_SPEECH`` and an average log-probability
under ``LOW_LOGPROB``, transcribe's own rule) gives no words. Text that cannot be what the window says (it
repeats itself: compression ratio over ``REPETITIVE``, transcribe's rule for a failed decode; or it has more
words than ``MAX_WORDS_PER_S`` allow in the window) is generated once more without the prompt, which is what
usually starts it (tiny.en given the last utterance as a prompt and a short one to hear was seen to say the
last one again, in a loop), and dropped if it fails again: the only case where a step generates twice.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hub.protocol import SAMPLE_RATE
from hub.results import Word

NO_SPEECH = 0.6  # transcribe's no_speech_threshold
LOW_LOGPROB = -1.0  # transcribe's log_prob_threshold
REPETITIVE = 2.4  # transcribe's compression_ratio_threshold: text that compresses more is a loop
MAX_WORDS_PER_S = 6.0  # fast speech is about 4 words a second: more is text the model did not hear
PREPEND_PUNCTUATIONS = "\"'“¿([{-"  # transcribe's defaults
APPEND_PUNCTUATIONS = "\"'.。,，!！?？:：”)]}、"
MAX_INITIAL_TIMESTAMP = 1.0  # transcribe's max_initial_timestamp


class WindowDecoder:
    """``decode(pcm, prompt) -> words`` for ``workers.streaming.WindowStreamer``, one model call of each kind."""

    def __init__(self, model: Any, options: dict[str, Any]) -> None:
        from faster_whisper.tokenizer import Tokenizer
        from faster_whisper.transcribe import get_compression_ratio, get_suppressed_tokens

        self.model = model  # a faster_whisper.WhisperModel
        self.language: str | None = options.get("language")
        self.task = str(options.get("task", "transcribe"))
        self.beam_size = int(options.get("beam_size", 5))
        temperature = options.get("temperature", 0.0)
        self.temperature = float(temperature[0] if isinstance(temperature, (list, tuple)) else temperature)
        self._tokenizer = Tokenizer
        self._suppressed = get_suppressed_tokens
        self._compression = get_compression_ratio
        self._tokenizers: dict[str | None, Any] = {}

    def tokenizer(self, language: str | None) -> Any:
        if language not in self._tokenizers:
            tokenizer = self._tokenizer(
                self.model.hf_tokenizer, self.model.model.is_multilingual, task=self.task, language=language
            )
            self._tokenizers[language] = (tokenizer, self._suppressed(tokenizer, [-1]))
        return self._tokenizers[language]

    def __call__(self, pcm: np.ndarray, prompt: str) -> list[Word]:
        from faster_whisper.audio import pad_or_trim

        model = self.model
        features = model.feature_extractor(pcm)
        frames = min(features.shape[-1] - 1, model.feature_extractor.nb_max_frames)
        if frames <= 0:
            return []
        encoded = model.encode(pad_or_trim(features[:, :frames]))
        tokenizer, suppressed = self.tokenizer(self._language(encoded))
        seconds = pcm.size / SAMPLE_RATE
        tokens = self._generate(encoded, tokenizer, suppressed, prompt)
        if tokens and self._unheard(tokenizer.decode(tokens), seconds):
            tokens = self._generate(encoded, tokenizer, suppressed, "") if prompt.strip() else []
            tokens = [] if tokens and self._unheard(tokenizer.decode(tokens), seconds) else tokens
        if not tokens:
            return []
        segment = {"seek": 0, "start": 0.0, "end": frames / model.frames_per_second, "tokens": tokens}
        model.add_word_timestamps(
            [[segment]],
            tokenizer,
            encoded,
            frames,
            PREPEND_PUNCTUATIONS,
            APPEND_PUNCTUATIONS,
            last_speech_timestamp=0.0,
        )
        return [Word(w["start"], w["end"], w["word"], w["probability"]) for w in segment.get("words", ())]

    def _generate(self, encoded: Any, tokenizer: Any, suppressed: Any, prompt: str) -> list[int]:
        """The text tokens of one beam search (none for a window heard as silence)."""
        model = self.model
        previous = tokenizer.encode(" " + prompt.strip()) if prompt.strip() else []
        search: dict[str, Any] = (
            {"beam_size": self.beam_size, "patience": 1.0}
            if self.temperature == 0
            else {"beam_size": 1, "num_hypotheses": 1, "sampling_topk": 0, "sampling_temperature": self.temperature}
        )
        result = model.model.generate(
            encoded,
            [model.get_prompt(tokenizer, previous)],
            length_penalty=1.0,
            max_length=model.max_length,
            return_scores=True,
            return_no_speech_prob=True,
            suppress_blank=True,
            suppress_tokens=suppressed,
            max_initial_timestamp_index=round(MAX_INITIAL_TIMESTAMP / model.time_precision),
            **search,
        )[0]
        tokens = [t for t in result.sequences_ids[0] if t < tokenizer.eot]  # text tokens: timestamps dropped
        average = result.scores[0] * len(tokens) / (len(tokens) + 1)
        return [] if result.no_speech_prob > NO_SPEECH and average < LOW_LOGPROB else tokens

    def _unheard(self, text: str, seconds: float) -> bool:
        """Text that is not what ``seconds`` of audio say: a loop, or more words than anyone says in that time."""
        return bool(self._compression(text) > REPETITIVE) or len(text.split()) > MAX_WORDS_PER_S * seconds + 2

    def _language(self, encoded: Any) -> str | None:
        """The asked language; English on an English-only model; else the one the model hears in the window."""
        if self.language or not self.model.model.is_multilingual:
            return self.language or "en"
        token = self.model.model.detect_language(encoded)[0][0][0]  # e.g. "<|de|>", the likeliest
        return str(token)[2:-2]
