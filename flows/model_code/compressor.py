"""The registered ``clara-compressor`` model, logged as code (see ``qa.py`` for why)."""

from mlflow.models import set_model

from flows.models import CompressorModel

set_model(CompressorModel())
