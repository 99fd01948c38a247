"""The registered ``clara`` QA model, logged as code: MLflow executes this file when the model is loaded, so
loading runs our code and reads safetensors, and never unpickles an object (a pickled ``python_model.pkl`` would
be executed by whoever loads it). ``set_model`` at import is MLflow's contract for such files."""

from mlflow.models import set_model

from clara_flows.models import ClaraQAModel

set_model(ClaraQAModel())
