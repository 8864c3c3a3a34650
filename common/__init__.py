"""phone-durations: phoneme durations for Matcha-TTS from your own corpus (the importable library)."""
__version__ = "0.9.0"
