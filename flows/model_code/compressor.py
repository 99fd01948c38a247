"""The registered ``clara-compressor`` model, logged as code (see ``qa.py`` for why)."""

from mlflow.models import set_model

from clara_flows.models import CompressorModel

set_model(CompressorModel())
