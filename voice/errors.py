"""Exceptions that end a command with one clear line instead of a traceback.

    VoiceError                  base: the CLI prints str(error) and exits with exit_code
      ├── ConfigError           config.yaml is invalid: names the file, the key and what is allowed
      ├── ModelError            a model package or file is missing, corrupt or incompatible
      ├── AudioInputError       an input recording cannot be read (missing, not WAV, truncated)
      └── AudioDeviceError      a sound device is missing, busy or rejects the sample rate

Every message says what failed, on which value, and what to do next.
"""


class VoiceError(Exception):
    """Base class for errors that a user can fix; the CLI prints the message alone."""

    exit_code = 1


class ConfigError(VoiceError):
    exit_code = 2


class ModelError(VoiceError):
    exit_code = 3


class AudioInputError(VoiceError):
    exit_code = 4


class AudioDeviceError(VoiceError):
    exit_code = 5


def first_line(error: BaseException) -> str:
    """Return the first line of an error's message, or its repr when the message is empty, for one-line errors."""
    return (str(error) or repr(error)).splitlines()[0]
