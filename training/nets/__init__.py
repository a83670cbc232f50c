"""Every network, registered by name (``get_model``); importing the package registers them all."""
from . import baselines, cnn, dehazer, handwritten, pretrained, resnet  # noqa: F401  (registration side effects)
from .classifier import ImageClassifier, build_classifier
from .registry import count_parameters, get_model, list_models, model_options, model_task, register_model

__all__ = ["ImageClassifier", "build_classifier", "count_parameters", "get_model", "list_models",
           "model_options", "model_task", "register_model"]
