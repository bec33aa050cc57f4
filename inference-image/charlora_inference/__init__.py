"""The inference server: one base model, many characters, hot LoRAs switched per request without restarts.

Runs as the Deployment of a ``CharacterServer`` (built into the image defined by ``inference-image/Dockerfile``).
"""
