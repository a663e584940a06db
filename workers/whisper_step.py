"""One live-session step on faster-whisper: one encode, one generate and one alignment of the window.

``WhisperModel.transcribe`` with word timings decodes a window twice whenever it ends inside a segment
(it seeks back to the last word and decodes the rest again), and retries at higher temperatures when a
decode looks poor: 1.66 encodes and 1.77 generates per step on the benchmark's clips (bench/README.md). A
step needs neither: the local-agreement rule only confirms words two decodes agree on, and the next step
decodes the tail again anyway. So a step here is exactly faster-whisper's core, called once: the window's
features, the encoder, a beam search at the first temperature (with
timestamp tokens, as transcribe's first pass: without them tiny.en dropped repeated sentences in the
benchmark, 16 % WER against 7 %), and the cross-attention alignment that gives each word its start and end,
over every text token (the unfinished last segment included: local agreement confirms it later).

A VAD-gated session's windows hold speech only, and the encoder hears them padded to ``stream.window_seconds``
(the longest window a step decodes, give or take the words it waits for) instead of Whisper's 30 s:
CTranslate2's encoder takes the shorter input, and its cost follows its length. Measured on tiny.en, one thread
(bench/README.md, "Live at scale"): a step 1.75x cheaper, and the live scenarios' finals p95 1.4 s instead of
3.0 s with no wrong word. A session without VAD keeps the 30 s: its windows may be silence, and with the
shorter padding tiny.en wrote words into the silences of the duty-cycle sessions (WER 23 % against 6 %).

The steps of several sessions with the same options share one of each call (``WindowDecoder.many``): the
worker steps them together when ``pool.max_batch`` allows (``workers.streaming.step_together``).

A window Whisper hears as silence (no-speech probability over ``NO_SPEECH`` and an average log-probability
under ``LOW_LOGPROB``, transcribe's own rule) gives no words. Text that cannot be what the window says (it
repeats itself: compression ratio over ``REPETITIVE``, transcribe's rule for a failed decode; or it has more
words than ``MAX_WORDS_PER_S`` allow in the window) is generated once more without the prompt, which is what
usually starts it (tiny.en given the last utterance as a prompt and a short one to hear was seen to say the
last one again, in a loop), and dropped if it fails again: the only case where a step decodes twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from hub.protocol import SAMPLE_RATE
from hub.results import Word
from workers.streaming import Window
from workers.whisper_batch import place_words

NO_SPEECH = 0.6  # transcribe's no_speech_threshold
LOW_LOGPROB = -1.0  # transcribe's log_prob_threshold
REPETITIVE = 2.4  # transcribe's compression_ratio_threshold: text that compresses more is a loop
MAX_WORDS_PER_S = 6.0  # fast speech is about 4 words a second: more is text the model did not hear
PREPEND_PUNCTUATIONS = "\"'“¿([{-"  # transcribe's defaults
APPEND_PUNCTUATIONS = "\"'.。,，!！?？:：”)]}、"
MAX_INITIAL_TIMESTAMP = 1.0  # transcribe's max_initial_timestamp


class WindowDecoder:
    """``decode(pcm, prompt) -> words`` for ``workers.streaming.WindowStreamer``, one model call of each kind."""

    def __init__(self, model: Any, options: dict[str, Any], pad_seconds: float) -> None:
        from faster_whisper.tokenizer import Tokenizer
        from faster_whisper.transcribe import get_compression_ratio, get_suppressed_tokens

        self.model = model  # a faster_whisper.WhisperModel
        self.pad_seconds = pad_seconds  # the encoder hears each window padded to this (at most 30 s)
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
        (words,) = self.many([(pcm, prompt)])
        if isinstance(words, Exception):
            raise words
        return words

    def many(self, windows: Sequence[Window]) -> list[list[Word] | Exception]:
        """The words of each window (audio, prompt): the steps of the sessions that share this decoder (their
        options are the same), in one forward pass each for the windows without a prompt and for those with one.

        CTranslate2 generates a batch only with the start-of-transcript token at one position in every prompt,
        so the prompts of one pass must have as many tokens: each prompt keeps the last tokens of its confirmed
        text, as many as the shortest prompt of the pass has (a session's own window, the audio it decodes, is
        never cut). A window decoded alone keeps its whole prompt."""
        prompts = [self._prompt_tokens(prompt) for _, prompt in windows]
        heard: list[list[Word] | Exception] = [[] for _ in windows]
        for prompted in (False, True):
            indices = [i for i, tokens in enumerate(prompts) if bool(tokens) is prompted]
            if not indices:
                continue
            shortest = min(len(prompts[i]) for i in indices)
            cut = [prompts[i][len(prompts[i]) - shortest :] for i in indices]
            for i, words in zip(indices, self._pass([windows[i][0] for i in indices], cut), strict=True):
                heard[i] = words
        return heard

    def _prompt_tokens(self, prompt: str) -> list[int]:
        """The confirmed text as the tokens before the start of transcript (the same in every language)."""
        tokenizer, _ = self.tokenizer(self.language or "en")
        return list(tokenizer.encode(" " + prompt.strip())) if prompt.strip() else []

    def _pass(self, pcms: list[np.ndarray], prompts: list[list[int]]) -> list[list[Word] | Exception]:
        """One encode, one generate and one align over ``pcms``, each after its prompt (all of one length). A
        window that must be generated again without its prompt, or whose language differs from the others' (a
        multilingual model detecting it), is decoded again alone."""
        from faster_whisper.audio import pad_or_trim

        model = self.model
        extractor = model.feature_extractor
        features = [extractor(pcm) for pcm in pcms]
        frames = [min(f.shape[-1] - 1, extractor.nb_max_frames) for f in features]
        heard: list[list[Word] | Exception] = [[] for _ in pcms]
        kept = [i for i, n in enumerate(frames) if n > 0]
        if not kept:
            return heard
        padded = min(extractor.nb_max_frames, round(self.pad_seconds * SAMPLE_RATE / extractor.hop_length))
        length = max(padded, *(frames[i] for i in kept))  # a window past window_seconds is not cut
        encoded = model.encode(np.stack([pad_or_trim(features[i][:, : frames[i]], length) for i in kept]))
        languages = self._languages(encoded, len(kept))
        if len(set(languages)) > 1:
            return [self._pass([pcm], [prompt])[0] for pcm, prompt in zip(pcms, prompts, strict=True)]
        tokenizer, suppressed = self.tokenizer(languages[0])
        generated = self._generate(encoded, tokenizer, suppressed, [prompts[i] for i in kept])
        rows: list[list[int]] = []
        for index, tokens in zip(kept, generated, strict=True):
            if tokens and self._unheard(tokenizer.decode(tokens), pcms[index].size / SAMPLE_RATE):
                # what usually starts a loop is the prompt: once more without it (a prompt-less decode that
                # still fails gives no words)
                heard[index] = self._pass([pcms[index]], [[]])[0] if prompts[index] else []
                tokens = []
            rows.append(tokens)
        if not any(rows):
            return heard
        alignments = model.find_alignment(tokenizer, rows, encoded, [frames[i] for i in kept])
        for index, tokens, alignment in zip(kept, rows, alignments, strict=True):
            if not tokens:
                continue
            segment = {"seek": 0, "start": 0.0, "end": frames[index] / model.frames_per_second, "tokens": tokens}
            place_words(
                model, [segment], tokenizer, alignment, frames[index], PREPEND_PUNCTUATIONS, APPEND_PUNCTUATIONS
            )
            heard[index] = [Word(w["start"], w["end"], w["word"], w["probability"]) for w in segment.get("words", ())]
        return heard

    def _generate(self, encoded: Any, tokenizer: Any, suppressed: Any, prompts: list[list[int]]) -> list[list[int]]:
        """The text tokens of one beam search per window (none for a window heard as silence)."""
        model = self.model
        search: dict[str, Any] = (
            {"beam_size": self.beam_size, "patience": 1.0}
            if self.temperature == 0
            else {"beam_size": 1, "num_hypotheses": 1, "sampling_topk": 0, "sampling_temperature": self.temperature}
        )
        results = model.model.generate(
            encoded,
            [model.get_prompt(tokenizer, previous) for previous in prompts],
            length_penalty=1.0,
            max_length=model.max_length,
            return_scores=True,
            return_no_speech_prob=True,
            suppress_blank=True,
            suppress_tokens=suppressed,
            max_initial_timestamp_index=round(MAX_INITIAL_TIMESTAMP / model.time_precision),
            **search,
        )
        texts = []
        for result in results:
            tokens = [t for t in result.sequences_ids[0] if t < tokenizer.eot]  # text tokens: timestamps dropped
            average = result.scores[0] * len(tokens) / (len(tokens) + 1)
            texts.append([] if result.no_speech_prob > NO_SPEECH and average < LOW_LOGPROB else tokens)
        return texts

    def _unheard(self, text: str, seconds: float) -> bool:
        """Text that is not what ``seconds`` of audio say: a loop, or more words than anyone says in that time."""
        return bool(self._compression(text) > REPETITIVE) or len(text.split()) > MAX_WORDS_PER_S * seconds + 2

    def _languages(self, encoded: Any, count: int) -> list[str | None]:
        """Each window's language: the asked one; English on an English-only model; else the one the model hears
        in the window."""
        if self.language or not self.model.model.is_multilingual:
            return [self.language or "en"] * count
        return [str(found[0][0])[2:-2] for found in self.model.model.detect_language(encoded)]  # e.g. "<|de|>"
