"""What support.forked's server imports once before it forks any run: what a tiny train.py run imports (torch,
torchvision, W&B through kd.engine, Hydra and its plugins, scikit-learn's digits). Nothing here runs a computation,
starts a thread or reads a test's environment, so each forked run starts as a fresh interpreter would, only sooner."""
import hydra.core.plugins
import sklearn.datasets  # noqa: F401  (kd.data.digits imports it when a run loads data)

import kd.config  # noqa: F401  (registers the schema)
import kd.engine  # noqa: F401  (torch, torchvision, wandb)
import kd.sweep  # noqa: F401  (the sweep callback)

hydra.core.plugins.Plugins.instance()  # imports every installed Hydra plugin: the launchers and sweepers
