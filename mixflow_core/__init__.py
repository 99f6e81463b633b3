"""mixflow: normalizing flows (i-ResNets and coupling flows) with a class-conditional Gaussian mixture prior.

The package root re-exports the thin core, mixflow_core.flows (build_model, MixtureFlow, the
configs, layers, estimators, objectives, prior); the layers above it (data, eval, training,
study, cli) are imported by name.
"""

from . import flows
from .flows import *  # noqa: F403  (the core's public API, listed in flows.__all__)
from .version import __version__

__all__ = [*flows.__all__, "__version__"]
