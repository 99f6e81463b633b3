"""The study on top of the library: the ablation, the notebooks' glue (analysis), the papermill report, plots, widgets.

``from mixflow_core import study`` gives the notebooks' glue (run_config, load_run, gaussian_panel, ...);
the other modules are imported by name (``from mixflow_core.study import ablation, plotting``).
"""

from .analysis import *  # noqa: F403  (the notebooks' glue, listed in analysis.__all__)
from .analysis import __all__  # noqa: F401
