"""The gradient chain: clipping, L2 and centralization of the gradient summed over replicas.

One implementation for the optimizers (:mod:`keras_gradops.optimizers`) and
the wrapper models (:mod:`keras_gradops.training`): :mod:`.chain` composes
:mod:`.clipping` and :mod:`.centralization`; :mod:`.guard` skips non-finite
steps. (Nothing is imported here, so :mod:`keras_gradops.ops` can use the
selection rules without an import cycle.)
"""
