"""Layers for parameter-efficient fine-tuning with guessed gradients."""

from keras_gradops.layers.prompt_tokens import PromptTokens

__all__ = ["PromptTokens"]
