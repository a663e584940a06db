#!/usr/bin/env bash
# Regenerates the speech clips in this folder from their reference texts.
# Needs Debian's espeak-ng and sox (apt-get install -y espeak-ng sox). The clips
# are committed, so the test suite itself needs neither.
set -euo pipefail
cd "$(dirname "$0")"
for ref in *.txt; do
  name="${ref%.txt}"
  espeak-ng -v en-us -s 150 -w "/tmp/${name}.raw.wav" -f "$ref"
  sox "/tmp/${name}.raw.wav" -r 16000 -c 1 -b 16 "${name}.wav"
  rm -f "/tmp/${name}.raw.wav"
done

# The same sentence in other containers, at 44.1 kHz stereo, so that tests exercise
# decoding and resampling: flac and ogg through sox, mp3 through PyAV (sox lacks an mp3 encoder).
sox coffee.wav -r 44100 -c 2 coffee.flac
sox coffee.wav -r 44100 -c 2 coffee.ogg
"${PYTHON:-../../.venv/bin/python}" - <<'PY'
import av

with av.open("coffee.wav") as src, av.open("coffee.mp3", "w") as dst:
    out = dst.add_stream("mp3", rate=44100, layout="stereo")
    resampler = av.AudioResampler(format=out.format, layout="stereo", rate=44100)
    for frame in src.decode(audio=0):
        for converted in resampler.resample(frame):
            dst.mux(out.encode(converted))
    for converted in resampler.resample(None):
        dst.mux(out.encode(converted))
    dst.mux(out.encode(None))
PY
