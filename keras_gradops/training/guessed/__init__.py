"""Forward-mode guessed-gradient training (Singhal et al., arXiv 2312.04709).

:class:`GuessedGradientModel` trains a Keras stack with ``model.fit`` from
forward-mode directional derivatives of guessed gradients instead of
backpropagation.
"""

from keras_gradops.training.guessed.diagnostics import cosine_similarity
from keras_gradops.training.guessed.estimator import GradientGuesser, GuessResult
from keras_gradops.training.guessed.methods import METHODS
from keras_gradops.training.guessed.model import GuessedGradientModel
from keras_gradops.training.guessed.stack import LayerStack

__all__ = ["METHODS", "GradientGuesser", "GuessResult", "GuessedGradientModel", "LayerStack", "cosine_similarity"]
