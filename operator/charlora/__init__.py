"""charlora: a Kubernetes operator that trains, versions and serves character LoRAs."""

__version__ = "0.1.0"
